// Records the bytes Go's net/http client writes for the ML-node calls a 2025 network node makes:
// upstream's dapi (gonka-ai/gonka 312044d, decentralized-api/utils/http.go SendPostJsonRequest and
// SendGetRequest) marshals a struct and posts it with no Content-Type, posts `nil` bodies, and gets.
// The structs below have the field order of upstream's mlnodeclient DTOs (poc.go InitDto, Params,
// ProofBatch; client.go inferenceUpDto), which decides the JSON's byte order.
//
// With a second directory it also records the 2026 network node's PoC v2 calls
// (redstartechno/gonka 8a35022b, decentralized-api/mlnodeclient/poc_v2_requests.go, client.go
// InferenceUp with dtype "auto"; the same SendPostJsonRequest), with upstream's struct field
// order and `omitempty`s, the callback URL built as broker/node_worker_commands.go builds it.
//
// Regenerate the fixtures the replay suite sends:
//
//	cd testing/dapi-wire && go run . ../../protocol/tests/fixtures/ml-node-requests-2025 \
//	  ../../protocol/tests/fixtures/ml-node-requests-2026
//
// `{host}`, `{callback}` and `{vector_N}` in them are filled in by the tests.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
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

type pocParamsV2 struct {
	Model  string `json:"model"`
	SeqLen int64  `json:"seq_len"`
}

type initGenerateV2 struct {
	BlockHash      string      `json:"block_hash"`
	BlockHeight    int64       `json:"block_height"`
	PublicKey      string      `json:"public_key"`
	NodeId         int         `json:"node_id"`
	NodeCount      int         `json:"node_count"`
	Params         pocParamsV2 `json:"params"`
	URL            string      `json:"url,omitempty"`
	PocStrongerRng bool        `json:"poc_stronger_rng,omitempty"`
}

type artifactV2 struct {
	Nonce     int64  `json:"nonce"`
	VectorB64 string `json:"vector_b64"`
}

type validationV2 struct {
	Artifacts []artifactV2 `json:"artifacts"`
}

type statTestV2 struct {
	DistThreshold   float64 `json:"dist_threshold,omitempty"`
	PMismatch       float64 `json:"p_mismatch,omitempty"`
	PValueThreshold float64 `json:"p_value_threshold,omitempty"`
}

type generateV2 struct {
	BlockHash      string        `json:"block_hash"`
	BlockHeight    int64         `json:"block_height"`
	PublicKey      string        `json:"public_key"`
	NodeId         int           `json:"node_id"`
	NodeCount      int           `json:"node_count"`
	Nonces         []int64       `json:"nonces"`
	Params         pocParamsV2   `json:"params"`
	Wait           bool          `json:"wait,omitempty"`
	URL            string        `json:"url,omitempty"`
	Validation     *validationV2 `json:"validation,omitempty"`
	StatTest       *statTestV2   `json:"stat_test,omitempty"`
	PocStrongerRng bool          `json:"poc_stronger_rng,omitempty"`
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
	out2026 := ""
	if len(os.Args) > 2 {
		out2026 = os.Args[2]
	}
	sendTo := func(dir, name, method, path string, payload any) {
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
		os.WriteFile(filepath.Join(dir, name), raw, 0o644)
	}
	send := func(name, method, path string, payload any) { sendTo(out, name, method, path, payload) }
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
	if out2026 == "" {
		return
	}
	send26 := func(name, method, path string, payload any) { sendTo(out2026, name, method, path, payload) }
	model := "Qwen/Tiny-Qwen3"
	callback := "http://{callback}/v2/poc-batches/" + url.PathEscape(url.PathEscape(model))
	params := pocParamsV2{Model: model, SeqLen: 8}
	send26("state.http", "GET", "/api/v1/state", nil)
	send26("inference_up.http", "POST", "/api/v1/inference/up", inferenceUp{Model: model, Dtype: "auto",
		Args: []string{"--max-model-len", "256"}})
	send26("pow_status_v2.http", "GET", "/api/v1/inference/pow/status", nil)
	send26("init_generate_v2.http", "POST", "/api/v1/inference/pow/init/generate", initGenerateV2{
		BlockHash: "0xblockhash", BlockHeight: 3600, PublicKey: "gonka-pubkey", NodeId: 1, NodeCount: 2,
		Params: params, URL: callback, PocStrongerRng: true})
	send26("stop_pow_v2.http", "POST", "/api/v1/inference/pow/stop", struct{}{})
	send26("generate_v2_validation.http", "POST", "/api/v1/inference/pow/generate", generateV2{
		BlockHash: "0xblockhash", BlockHeight: 3600, PublicKey: "gonka-pubkey", NodeId: 2, NodeCount: 2,
		Nonces: []int64{1, 3}, Params: params, URL: callback,
		Validation: &validationV2{Artifacts: []artifactV2{{Nonce: 1, VectorB64: "{vector_1}"}, {Nonce: 3, VectorB64: "{vector_3}"}}},
		StatTest:   &statTestV2{DistThreshold: 0.4, PMismatch: 0.1, PValueThreshold: 0.05}, PocStrongerRng: true})
}
