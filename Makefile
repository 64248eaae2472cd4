GO      ?= go
BIN     := bin/forkd
PKGS    := ./...
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
export GOFLAGS ?= -mod=mod

.PHONY: build demo test vet staticcheck bench fmt-check clean

build:
	$(GO) build -o $(BIN) ./cmd/forkd

# The main job: a daemon in a temp data dir, driven end to end through the API,
# then everything it started is stopped and removed.
demo: build
	./$(BIN) demo

vet:
	$(GO) vet $(PKGS)

# staticcheck comes through the Go module proxy; where that is unreachable the
# step says so and is skipped rather than failing the build.
staticcheck:
	@if $(GO) run $(STATICCHECK) -version >/dev/null 2>&1; then \
		echo "staticcheck $(PKGS)"; $(GO) run $(STATICCHECK) $(PKGS); \
	else echo "staticcheck: not installable through the Go proxy here; skipped"; fi

# What CI runs. Tests that need root, loop devices or userfaultfd skip with a
# reason when those are missing (-v is off, so `go test` prints skips only on
# failure; run with V=1 to see them).
test: build vet staticcheck
	$(GO) test -race -count=1 -timeout 25m $(if $(V),-v,) $(PKGS)

fmt-check:
	@out=$$(gofmt -l cmd internal api); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

bench: build
	./$(BIN) bench fork-burst

clean:
	rm -rf bin
