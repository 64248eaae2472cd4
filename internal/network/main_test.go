package network_test

import (
	"os"
	"testing"

	"github.com/forkd/forkd/internal/testenv"
)

// TestMain fails the run if any test here made a VM link in the host's own
// namespace (every Host these tests open lives in a namespace of theirs).
func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }
