// Command kwok-stages prints kwok's own default "fast" stages (node initialisation; pod ready,
// complete and delete) as one YAML stream. The kwok binary starts with no stages unless its
// configuration lists them, and these ship inside the kwok module rather than the binary; the
// e2e harness appends this output to the configuration it writes.
package main

import (
	"fmt"

	nodefast "sigs.k8s.io/kwok/kustomize/stage/node/fast"
	podfast "sigs.k8s.io/kwok/kustomize/stage/pod/fast"
)

func main() {
	for _, stage := range []string{
		nodefast.DefaultNodeInit,
		podfast.DefaultPodReady,
		podfast.DefaultPodComplete,
		podfast.DefaultPodDelete,
	} {
		fmt.Println("---")
		fmt.Print(stage)
	}
}
