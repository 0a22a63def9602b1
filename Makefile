# peerlink: `make test` is the whole suite (what CI runs); `make selftest` builds the kernel
# NAT lab and checks every NAT kind with real probes (root).

GO        ?= go
FUZZTIME  ?= 3s
ROOT      := $(shell id -u)
# The Go release with the standard library's latest security fixes; the go command
# fetches it from the module proxy (about 76 MB, once per machine). The module itself
# builds with Go 1.26 too.
GOTOOLCHAIN ?= go1.27.3
export GOTOOLCHAIN
# govulncheck, and the vulnerability reports it checks against: a snapshot of the Go
# vulnerability database from the module proxy (vuln.go.dev need not be reachable).
# Bump VULNDB to check against newer reports.
GOVULNCHECK ?= golang.org/x/vuln/cmd/govulncheck@v1.9.0
VULNDB      ?= golang.org/x/vulndb@v0.0.0-20261105234957-e22db6528018

.PHONY: test deps check vulncheck unit fuzz-smoke bench-smoke fuzz build selftest lab-down bench

test: deps check vulncheck unit fuzz-smoke bench-smoke
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

vulncheck:
	@db=$$(mktemp -d) && trap 'rm -rf "$$db"' EXIT && \
	$(GO) run ./internal/cmd/vulndb -module $(VULNDB) -out "$$db" && \
	echo "govulncheck against $(VULNDB)" && \
	$(GO) run $(GOVULNCHECK) -db "file://$$db" ./...

# Kernel lab tests run here too when root; without root they skip with a message.
unit:
	$(GO) test -race -count=1 -timeout 15m ./...

fuzz-smoke:
	@FUZZTIME=$(FUZZTIME) ./scripts/fuzz.sh

# Benchmarks are measured on demand (make bench); here each runs once to keep it working.
bench-smoke:
	$(GO) test -run '^$$' -bench . -benchtime 1x $$(grep -rl --include='*_test.go' '^func Benchmark' . | xargs -n1 dirname | sort -u) >/dev/null

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
