// The network node's side of upstream's mutual TLS, for the daemon's tests: Go's crypto/tls set
// up as gonka-ai/gonka's decentralized-api/internal/mtls sets it up (the client trusts only the
// ML node's certificate as its root and checks the host against it; the callback server asks
// for and verifies a client certificate against the ML node's), so the daemon meets the TLS
// stack the network node really runs.
//
//	mtls-peer request <METHOD> <url> <cert|-> <key|-> <root> [<JSON body>]
//	    prints "STATUS <code>" and the body, or "ERROR <why>" (exit 2)
//	mtls-peer serve <cert> <key> <client-root>
//	    prints "LISTENING <port>", then "<METHOD> <path> <bytes>" per request, answering 200
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

func pool(path string) *x509.CertPool {
	pem, err := os.ReadFile(path)
	if err != nil {
		fail(err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(pem) {
		fail(fmt.Errorf("no certificate in %s", path))
	}
	return p
}

func fail(err error) {
	fmt.Printf("ERROR %v\n", err)
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: mtls-peer request|serve ..."))
	}
	switch os.Args[1] {
	case "request":
		method, url, certFile, keyFile, root := os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[6]
		config := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool(root)}
		if certFile != "-" {
			cert, err := tls.LoadX509KeyPair(certFile, keyFile)
			if err != nil {
				fail(err)
			}
			config.Certificates = []tls.Certificate{cert}
		}
		var body io.Reader
		if len(os.Args) > 7 {
			body = strings.NewReader(os.Args[7])
		}
		request, err := http.NewRequest(method, url, body)
		if err != nil {
			fail(err)
		}
		if body != nil {
			request.Header.Set("Content-Type", "application/json")
		}
		client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{TLSClientConfig: config}}
		resp, err := client.Do(request)
		if err != nil {
			fail(err)
		}
		defer resp.Body.Close()
		answer, _ := io.ReadAll(resp.Body)
		fmt.Printf("STATUS %d\n%s\n", resp.StatusCode, answer)
	case "serve":
		certFile, keyFile, clientRoot := os.Args[2], os.Args[3], os.Args[4]
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			fail(err)
		}
		listener, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fail(err)
		}
		out := bufio.NewWriter(os.Stdout)
		requests := make(chan string, 1024)
		go func() {
			for line := range requests {
				fmt.Fprintln(out, line)
				out.Flush()
			}
		}()
		fmt.Fprintf(out, "LISTENING %d\n", listener.Addr().(*net.TCPAddr).Port)
		out.Flush()
		server := &http.Server{
			TLSConfig: &tls.Config{
				MinVersion:   tls.VersionTLS12,
				Certificates: []tls.Certificate{cert},
				ClientCAs:    pool(clientRoot),
				ClientAuth:   tls.RequireAndVerifyClientCert,
			},
			Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				body, _ := io.ReadAll(r.Body)
				requests <- fmt.Sprintf("%s %s %d", r.Method, r.URL.Path, len(body))
				w.WriteHeader(http.StatusOK)
			}),
		}
		fail(server.ServeTLS(listener, "", ""))
	default:
		fail(fmt.Errorf("unknown mode %q", os.Args[1]))
	}
}
