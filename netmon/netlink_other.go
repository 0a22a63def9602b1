//go:build !linux

package netmon

import "errors"

func openNetlink() (source, error) { return nil, errors.New("netmon: no netlink on this system") }
