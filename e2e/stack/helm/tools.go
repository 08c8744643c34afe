//go:build tools

// Package helm pins the chart linter and renderer the tests use; see go.mod.
package helm

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
