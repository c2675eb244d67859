// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3 at a pinned release.
// The upstream module carries local `replace` directives, so `go install` refuses it; this tiny
// wrapper requires the server and its sibling modules at one release and calls its entry point.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
