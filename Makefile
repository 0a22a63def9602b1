# peerlink: `make test` is the whole suite (what CI runs); `make selftest` builds the kernel
# NAT lab and checks every NAT kind with real probes (root).

GO        ?= go
FUZZTIME  ?= 5s
ROOT      := $(shell id -u)

.PHONY: test deps check unit fuzz-smoke bench-smoke fuzz build selftest lab-down bench

test: deps check unit fuzz-smoke bench-smoke
	@if [ "$(ROOT)" != "0" ]; then echo "NOTE: not root: the kernel NAT lab tests were skipped (run 'sudo make test' for them)."; fi
	@echo "make test: all passed"

deps:
	@./scripts/deps.sh

build:
	$(GO) build -o bin/peerlink ./cmd/peerlink

check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

# Kernel lab tests run here too when root; without root they skip with a message.
unit:
	$(GO) test -race -count=1 -timeout 15m ./...

fuzz-smoke:
	@FUZZTIME=$(FUZZTIME) ./scripts/fuzz.sh

# Benchmarks are measured on demand (make bench); here each runs once to keep it working.
bench-smoke:
	$(GO) test -run '^$$' -bench . -benchtime 1x ./... >/dev/null

fuzz:
	@FUZZTIME=2m ./scripts/fuzz.sh

# Measures peerlink against coturn and the machine's limit (BENCHMARKS.md); the kernel
# lab sections need root. -quick, -only SECTIONS and -json are passed with BENCHFLAGS.
bench:
	$(GO) run ./internal/cmd/bench $(BENCHFLAGS)

selftest: build
	./bin/peerlink lab selftest

lab-down: build
	./bin/peerlink lab down
