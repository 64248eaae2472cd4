SHELL   := /bin/bash
GO      ?= go
BIN     := bin/forkd
PKGS    := ./...
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
export GOFLAGS ?= -mod=mod

.PHONY: build demo test test-oldest conformance vet staticcheck bench fmt-check clean fuzz-short

# Static (no cgo): forkd is also the VMM a jailer execs inside an empty
# jail, where no dynamic loader exists.
build:
	CGO_ENABLED=0 $(GO) build -o $(BIN) ./cmd/forkd

# The main job: a daemon in a temp data dir, driven end to end through the API,
# then everything it started is stopped and removed.
demo: build
	./$(BIN) demo

vet:
	$(GO) vet $(PKGS)

# staticcheck comes through the Go module proxy. One that cannot be installed
# fails the target: a check that silently does not run hides what it would
# find. Offline, `make test STATICCHECK_SKIP=1` skips it and says so.
staticcheck:
	@if [ -n "$(STATICCHECK_SKIP)" ]; then echo "staticcheck: SKIPPED (STATICCHECK_SKIP is set)"; exit 0; fi; \
	if ! out=$$($(GO) run $(STATICCHECK) -version 2>&1); then \
		echo "staticcheck: cannot install $(STATICCHECK) through the Go module proxy:"; echo "$$out"; \
		echo "(offline? run make test STATICCHECK_SKIP=1)"; exit 1; fi; \
	echo "staticcheck $(PKGS)"; $(GO) run $(STATICCHECK) $(PKGS)

# What CI runs. Tests that need root, loop devices or userfaultfd skip with a
# reason when those are missing, unless FORKD_TEST_REQUIRE names them (CI
# does: there a missing requirement fails). The output keeps every SKIP with its reason,
# every failure and each package's result, and drops the RUN/PASS noise
# (the full log is in bin/test.log).
test: build vet staticcheck
	@set -o pipefail; $(GO) test -race -count=1 -timeout 25m -v $(PKGS) 2>&1 | tee bin/test.log | \
		grep -v -E '^(=== (RUN|PAUSE|CONT|NAME)|\s*--- PASS|PASS$$)'
	@$(MAKE) --no-print-directory test-oldest

# The suite above runs the emulator as the newest supported Firecracker
# release. This runs the driver's and the manager's tests, and the crash
# suite's lifecycle, standby, restore, fork and crash scenarios, again as
# the oldest (each release refuses the fields it does not know, so a request
# built for the wrong release fails here).
FC_OLDEST   := 1.10
OLDEST_PKGS := ./internal/firecracker ./internal/instance ./internal/reliability
OLDEST_RUN  := ^Test(Launch|Client|Emulator|Every|Standby|Restore|Fork|Crash|Uffd|Reconcile|Restart|VMM|Snapshot|Source|NoVMWrites|AFork)
test-oldest:
	@echo "go test (Firecracker $(FC_OLDEST)) $(OLDEST_PKGS)"
	@set -o pipefail; FORKD_TEST_FIRECRACKER_VERSION=$(FC_OLDEST) $(GO) test -race -count=1 -timeout 20m -v \
		-run '$(OLDEST_RUN)' $(OLDEST_PKGS) 2>&1 | tee bin/test-oldest.log | \
		grep -v -E '^(=== (RUN|PAUSE|CONT|NAME)|\s*--- PASS|PASS$$)'

# The conformance suite (internal/conformance): lifecycle, standby, fork,
# snapshot, Uffd and crash scenarios through a real daemon, against the
# emulator at every supported Firecracker release, and against real
# Firecracker where the host has /dev/kvm, firecracker and jailer, and
# FORKD_CONFORMANCE_KERNEL/ROOTFS are set (see docs/real-firecracker.md).
# Where any is missing the real target skips naming it (fails under
# FORKD_TEST_REQUIRE=kvm). FORKD_CONFORMANCE_VMM=emulator|firecracker
# runs one kind only.
conformance: build
	@set -o pipefail; FORKD_CONFORMANCE_VERSIONS=$${FORKD_CONFORMANCE_VERSIONS:-all} \
		$(GO) test -race -count=1 -timeout 45m -v ./internal/conformance 2>&1 | tee bin/conformance.log | \
		grep -v -E '^(=== (RUN|PAUSE|CONT|NAME)|PASS$$)'

fmt-check:
	@out=$$(gofmt -l cmd internal api); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

bench: build
	./$(BIN) bench fork-burst

clean:
	rm -rf bin

# Every Go fuzz target, each run for FUZZTIME (CI: a short bounded run; the
# seed corpora also run as plain tests under `make test`). A Fuzz function
# missing from this list fails the target, so none is silently skipped. A
# target that fails with nothing but "context deadline exceeded" and writes
# no failing input is run once more: Go 1.26's fuzz coordinator can report
# its own -fuzztime deadline as a failure (fixed in Go 1.27); a second such
# failure, and any failing input, fails the target.
FUZZTIME ?= 10s
FUZZ_TARGETS := \
	./internal/api:FuzzRequestBodies \
	./internal/api:FuzzHandlerRequestDecoding \
	./internal/uffd:FuzzParseHandshake \
	./internal/uffd:FuzzDecodeMsg \
	./internal/emulator:FuzzDecodeVMState \
	./internal/emulator:FuzzDecodeVMStateBody

fuzz-short:
	@set -e; for f in $$(grep -rhoE '^func Fuzz[A-Za-z0-9_]+' --include='*_test.go' cmd internal | sed 's/^func //'); do \
		case " $(FUZZ_TARGETS) " in *":$$f "*) ;; *) echo "fuzz-short: $$f is not in FUZZ_TARGETS"; exit 1 ;; esac; done; \
	for t in $(FUZZ_TARGETS); do pkg=$${t%%:*}; fn=$${t##*:}; \
		for try in 1 2; do \
		echo "fuzz $$pkg $$fn for $(FUZZTIME)"; \
		rc=0; out=$$($(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) $$pkg 2>&1) || rc=$$?; \
		echo "$$out" | grep -v -E '^fuzz: elapsed' || true; \
		if [ $$rc -ne 0 ] && [ $$try = 1 ] && echo "$$out" | grep -q -x '    context deadline exceeded' && \
			! echo "$$out" | grep -q 'Failing input written'; then \
			echo "fuzz-short: $$fn: Go's fuzz coordinator reported its own -fuzztime deadline as a failure, with no failing input (a race in Go 1.26's internal/fuzz, golang/go#75804): running it once more"; \
			continue; fi; \
		if [ $$rc -ne 0 ] || echo "$$out" | grep -q 'no fuzz tests'; then echo "fuzz-short: $$fn failed"; exit 1; fi; \
		break; done; done
