// HTTPS service on Go's net/http + crypto/tls (standard library only; built by the test with
// Debian's golang-go). Routes as http_server.py: GET /users/<id>, POST /orders, GET /missing
// (404), GET /fail (500), GET /slow (300 ms). Usage: tls_go_server PORT CERT KEY
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

func main() {
	port, cert, key := os.Args[1], os.Args[2], os.Args[3]
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		switch {
		case r.Method == http.MethodPost:
			io.Copy(io.Discard, r.Body)
			w.WriteHeader(201)
			fmt.Fprint(w, "created\n")
		case r.URL.Path == "/slow":
			time.Sleep(300 * time.Millisecond)
			fmt.Fprint(w, "slow\n")
		case r.URL.Path == "/fail":
			w.WriteHeader(500)
			fmt.Fprint(w, "boom\n")
		case strings.HasPrefix(r.URL.Path, "/users/"):
			fmt.Fprintf(w, "{\"user\": %q}\n", r.URL.Path[7:])
		default:
			w.WriteHeader(404)
			fmt.Fprint(w, "not found\n")
		}
	})
	srv := &http.Server{Addr: "127.0.0.1:" + port, Handler: mux}
	if err := srv.ListenAndServeTLS(cert, key); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
