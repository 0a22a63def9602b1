// Command peerlink is the peerlink toolkit: servers, NAT profiling, the NAT labs and,
// as they land, connecting peers.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"sort"
	"syscall"
)

// command is one subcommand. run parses its own flags from args; it returns errUsage
// (wrapped or not) for bad invocations so main exits with 2.
type command struct {
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

var errUsage = errors.New("usage")

func commands() map[string]command {
	return map[string]command{
		"agent":      {"run a node that accepts connections and echoes datagrams (the other end of connect)", runAgent},
		"demo":       {"run peerlink end to end in an emulated internet: NAT profiles and a who-connects-how matrix", runDemo},
		"cat":        {"netcat across NATs: stdin and stdout over an encrypted stream to a node", runCat},
		"chat":       {"chat across NATs: stdin lines as messages to a node, its messages on stdout", runChat},
		"connect":    {"connect to a node and report how: method, technique, time to first byte", runConnect},
		"id":         {"print this node's NodeID (creating its identity on first use)", runID},
		"lab":        {"build, test and tear down the kernel NAT lab (root)", runLab},
		"netcheck":   {"profile the local NAT: mapping, filtering, allocation, public address", runNetcheck},
		"party":      {"make and manage parties: create, invite, join, leave, kick, list", runParty},
		"up":         {"join a party's virtual LAN: a TUN interface and WireGuard over peerlink (root)", runUp},
		"down":       {"stop 'peerlink up'", runDown},
		"status":     {"show the party 'peerlink up' runs: members, virtual IPs, method, latency", runStatus},
		"receive":    {"receive a file sent with 'peerlink send', checked with SHA-256, into a directory", runReceive},
		"relay":      {"run a TURN relay (RFC 8656)", runRelay},
		"send":       {"send a file to a node running 'peerlink receive', with progress and a SHA-256 check", runSend},
		"serve":      {"run every server in one process: rendezvous, STUN (RFC 5780) and TURN relay", runServe},
		"rendezvous": {"run the rendezvous (signaling) server alone", runRendezvous},
		"stun":       {"run a STUN server (RFC 8489, RFC 5780 with --alt-ip)", runSTUN},
		"tunnel":     {"TCP tunnel across NATs: expose a local port, or forward one to a node's exposed port", runTunnel},
		"version":    {"print the version", runVersion},
	}
}

var version = "dev"

func runVersion(_ context.Context, _ []string, stdout, _ io.Writer) error {
	fmt.Fprintln(stdout, "peerlink", version)
	return nil
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "peerlink: NAT traversal toolkit — direct, hole-punched or relayed connections between any two peers.")
	fmt.Fprintln(w, "\nUsage: peerlink <command> [flags]\n\nCommands:")
	cmds := commands()
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, cmds[n].summary)
	}
	fmt.Fprintln(w, "\nRun 'peerlink <command> -h' for a command's flags and examples.")
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes one command line and returns the process exit code: 0 success, 1 failure,
// 2 bad usage.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, ok := commands()[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "peerlink: unknown command %q\n\n", args[0])
		usage(stderr)
		return 2
	}
	if path := os.Getenv("PEERLINK_CPUPROFILE"); path != "" {
		// For finding what bounds a command's speed: go tool pprof peerlink PATH.
		if f, err := os.Create(path); err == nil {
			if pprof.StartCPUProfile(f) == nil {
				defer func() { pprof.StopCPUProfile(); f.Close() }()
			}
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := cmd.run(ctx, args[1:], stdout, stderr)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "peerlink %s: %v\n", args[0], err)
		return 2
	default:
		fmt.Fprintf(stderr, "peerlink %s: %v\n", args[0], err)
		return 1
	}
}
