// Package api is forkd's HTTP API: the wire types, the Service interface the
// instance manager implements, the HTTP handlers that expose a Service, and
// the typed client the CLI uses. The contract is api/openapi.yaml (embedded
// by package apispec); a conformance test validates real responses against it.
//
// The handlers own the HTTP edge and nothing else: strict decoding of bodies,
// validation of names and sizes, bearer-token auth on TCP, metrics, and the
// mapping from the Service's sentinel errors to status codes (errors.go, the
// only place that mapping lives). A request the edge refuses never reaches
// the Service, so a bad request can change nothing. Resolving references
// (id, name, id prefix) and every lifecycle rule belong to the Service.
package api
