//go:build !linux

package partynet

import (
	"errors"
	"net/netip"
)

var errUnsupported = errors.New("partynet: party interfaces are supported on Linux only")

func checkConflicts(string, ...netip.Prefix) error { return nil }

func configure(string, netip.Prefix, netip.Prefix) error { return errUnsupported }
