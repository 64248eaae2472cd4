// Package apispec embeds forkd's OpenAPI document, api/openapi.yaml: the
// contract of the daemon's HTTP API. The handlers serve it at
// GET /openapi.yaml and the conformance tests validate real responses
// against it. It holds no code beyond the embedding.
package apispec

import _ "embed"

// OpenAPI is the text of api/openapi.yaml. A string, so nobody can change it.
//
//go:embed openapi.yaml
var OpenAPI string
