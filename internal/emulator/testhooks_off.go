//go:build !forkd_testhooks

package emulator

import "net/http"

// TestHooks is false in the shipped binary: it has no test requests.
const TestHooks = false

func registerTestHooks(*http.ServeMux) {}

func testHookSchemas() map[string]*schema { return nil }
