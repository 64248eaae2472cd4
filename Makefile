GO      ?= go
BIN     := bin/forkd
PKGS    := ./...
export GOFLAGS ?= -mod=mod

.PHONY: build demo test vet staticcheck bench clean

build:
	$(GO) build -o $(BIN) ./cmd/forkd

# The main job: a daemon in a temp data dir on the embedded defaults, driven end to end.
demo: build
	./$(BIN) demo

vet:
	$(GO) vet $(PKGS)

staticcheck:
	@if $(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 -version >/dev/null 2>&1; then \
		$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 $(PKGS); \
	else echo "staticcheck: not installable through the Go proxy here; skipped"; fi

test: build vet staticcheck
	$(GO) test -race -count=1 -timeout 25m $(PKGS)

bench: build
	./$(BIN) bench fork-burst

clean:
	rm -rf bin
