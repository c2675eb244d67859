//go:build tools

// Wrapper module that pins Helm for the chart tests: build.sh builds helm.sh/helm/v3/cmd/helm
// from it into the control-plane cache.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
