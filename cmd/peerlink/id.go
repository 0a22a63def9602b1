package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"

	"peerlink/identity"
)

func runID(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("peerlink id", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("identity", "", "identity key file (default: $PEERLINK_IDENTITY, else peerlink/identity.key in the user's config directory)")
	fs.Usage = func() {
		fmt.Fprint(stderr, `Usage: peerlink id [--identity FILE]

Prints this node's NodeID, the text form of its ed25519 public key that peers use to
address it. The key pair is created on first use, in a file only its owner can read
(mode 0600); a key file readable by others is refused.

Examples:
  peerlink id
  peerlink id --identity /etc/peerlink/identity.key

Flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	p := *path
	if p == "" {
		var err error
		if p, err = identity.DefaultPath(); err != nil {
			return err
		}
	}
	id, err := identity.LoadOrCreate(p)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, id.NodeID())
	return nil
}
