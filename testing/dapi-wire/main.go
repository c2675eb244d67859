// Records the bytes Go's net/http client writes for the ML-node calls a 2025 network node makes:
// upstream's dapi (gonka-ai/gonka 312044d, decentralized-api/utils/http.go SendPostJsonRequest and
// SendGetRequest) marshals a struct and posts it with no Content-Type, posts `nil` bodies, and gets.
// The structs below have the field order of upstream's mlnodeclient DTOs (poc.go InitDto, Params,
// ProofBatch; client.go inferenceUpDto), which decides the JSON's byte order.
//
// Regenerate the fixtures the replay suite sends:
//   cd testing/dapi-wire && go run . ../../protocol/tests/fixtures/ml-node-requests-2025
// `{host}` and `{callback}` in them are filled in by the tests.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
)

type params struct {
	Dim              int     `json:"dim"`
	NLayers          int     `json:"n_layers"`
	NHeads           int     `json:"n_heads"`
	NKVHeads         int     `json:"n_kv_heads"`
	VocabSize        int     `json:"vocab_size"`
	FFNDimMultiplier float64 `json:"ffn_dim_multiplier"`
	MultipleOf       int     `json:"multiple_of"`
	NormEps          float64 `json:"norm_eps"`
	RopeTheta        int     `json:"rope_theta"`
	UseScaledRope    bool    `json:"use_scaled_rope"`
	SeqLen           int     `json:"seq_len"`
}

type initDto struct {
	BlockHash      string  `json:"block_hash"`
	BlockHeight    int64   `json:"block_height"`
	PublicKey      string  `json:"public_key"`
	BatchSize      int     `json:"batch_size"`
	RTarget        float64 `json:"r_target"`
	FraudThreshold float64 `json:"fraud_threshold"`
	Params         *params `json:"params"`
	NodeNum        uint64  `json:"node_id"`
	TotalNodes     int64   `json:"node_count"`
	URL            string  `json:"url"`
}

type proofBatch struct {
	PublicKey   string    `json:"public_key"`
	BlockHash   string    `json:"block_hash"`
	BlockHeight int64     `json:"block_height"`
	Nonces      []int64   `json:"nonces"`
	Dist        []float64 `json:"dist"`
	NodeNum     uint64    `json:"node_id"`
}

type inferenceUp struct {
	Model string   `json:"model"`
	Dtype string   `json:"dtype"`
	Args  []string `json:"additional_args"`
}

func main() {
	out := os.Args[1]
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	captured := make(chan []byte, 1)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			r := bufio.NewReader(c)
			var raw bytes.Buffer
			length := 0
			for {
				line, _ := r.ReadString('\n')
				raw.WriteString(line)
				if strings.HasPrefix(line, "Content-Length: ") {
					fmt.Sscanf(strings.TrimSpace(line[16:]), "%d", &length)
				}
				if line == "\r\n" {
					break
				}
			}
			body := make([]byte, length)
			io.ReadFull(r, body)
			raw.Write(body)
			captured <- raw.Bytes()
			c.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"))
			c.Close()
		}
	}()
	base := "http://" + ln.Addr().String()
	client := &http.Client{}
	send := func(name, method, path string, payload any) {
		var req *http.Request
		if payload == nil {
			req, _ = http.NewRequest(method, base+path, nil)
		} else {
			b, _ := json.Marshal(payload)
			req, _ = http.NewRequest(method, base+path, bytes.NewBuffer(b))
		}
		resp, err := client.Do(req)
		if err != nil {
			panic(err)
		}
		resp.Body.Close()
		raw := bytes.ReplaceAll(<-captured, []byte(ln.Addr().String()), []byte("{host}"))
		os.WriteFile(filepath.Join(out, name), raw, 0o644)
	}
	small := &params{Dim: 64, NLayers: 2, NHeads: 4, NKVHeads: 4, VocabSize: 96, FFNDimMultiplier: 1.3,
		MultipleOf: 32, NormEps: 1e-5, RopeTheta: 10000, UseScaledRope: false, SeqLen: 8}
	dto := initDto{BlockHash: "0xblockhash", BlockHeight: 1000, PublicKey: "gonka-pubkey", BatchSize: 100,
		RTarget: 1.4013564660458173, FraudThreshold: 1e-7, Params: small, NodeNum: 1, TotalNodes: 2,
		URL: "http://{callback}/v1/poc-batches"}
	send("state.http", "GET", "/api/v1/state", nil)
	send("pow_status.http", "GET", "/api/v1/pow/status", nil)
	send("stop.http", "POST", "/api/v1/stop", nil)
	send("pow_init_generate.http", "POST", "/api/v1/pow/init/generate", dto)
	send("pow_init_validate.http", "POST", "/api/v1/pow/init/validate", dto)
	send("pow_validate.http", "POST", "/api/v1/pow/validate", proofBatch{PublicKey: "gonka-pubkey",
		BlockHash: "0xblockhash", BlockHeight: 1000, Nonces: []int64{7, 9}, Dist: []float64{1.2, 1.3}})
	send("inference_up.http", "POST", "/api/v1/inference/up", inferenceUp{Model: "Qwen/Qwen2.5-7B-Instruct",
		Dtype: "float16", Args: []string{"--quantization", "fp8"}})
	send("health.http", "GET", "/health", nil)
}
