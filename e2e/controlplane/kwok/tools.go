//go:build tools

// Wrapper module that pins kwok (sigs.k8s.io/kwok), the simulator of fake nodes and their pods'
// lifecycle, so build.sh can `go build sigs.k8s.io/kwok/cmd/kwok` at this release.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
