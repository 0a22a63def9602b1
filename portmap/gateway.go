package portmap

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
)

// routeFiles hold Linux's IPv4 routing table. The thread's own view comes first: a
// thread switched into another network namespace sees that namespace's routes there,
// while /proc/net follows the process's main thread.
var routeFiles = []string{"/proc/thread-self/net/route", "/proc/net/route"}

const routeFile = "/proc/net/route"

// DefaultGateway returns the IPv4 default gateway with the lowest metric from
// /proc/net/route, or an error wrapping ErrNoGateway.
func DefaultGateway() (netip.Addr, error) {
	var err error
	for _, f := range routeFiles {
		var b []byte
		if b, err = os.ReadFile(f); err == nil {
			return parseRoutes(b)
		}
	}
	return netip.Addr{}, fmt.Errorf("%w: %v", ErrNoGateway, err)
}

// Route flags from linux/route.h.
const (
	rtfUp      = 0x1
	rtfGateway = 0x2
)

// parseRoutes picks the default gateway out of /proc/net/route's text. Addresses there
// are 32-bit words printed in the kernel's byte order, which is this machine's.
func parseRoutes(b []byte) (netip.Addr, error) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	var best netip.Addr
	bestMetric := -1
	first := true
	for sc.Scan() {
		line := sc.Text()
		if first {
			first = false
			if strings.HasPrefix(line, "Iface") {
				continue
			}
		}
		f := strings.Fields(line)
		if len(f) < 8 {
			continue
		}
		dst, err1 := hexWord(f[1])
		gw, err2 := hexWord(f[2])
		flags, err3 := strconv.ParseUint(f[3], 16, 32)
		metric, err4 := strconv.Atoi(f[6])
		mask, err5 := hexWord(f[7])
		if err1 != nil || err2 != nil || err3 != nil || err4 != nil || err5 != nil {
			return netip.Addr{}, fmt.Errorf("%w: bad line in %s: %q", ErrMalformed, routeFile, line)
		}
		if dst != 0 || mask != 0 || flags&(rtfUp|rtfGateway) != rtfUp|rtfGateway || gw == 0 || metric < 0 {
			continue
		}
		if bestMetric < 0 || metric < bestMetric {
			var a [4]byte
			binary.NativeEndian.PutUint32(a[:], gw)
			best, bestMetric = netip.AddrFrom4(a), metric
		}
	}
	if err := sc.Err(); err != nil {
		return netip.Addr{}, fmt.Errorf("%w: reading %s: %v", ErrMalformed, routeFile, err)
	}
	if !best.IsValid() {
		return netip.Addr{}, fmt.Errorf("%w in %s", ErrNoGateway, routeFile)
	}
	return best, nil
}

func hexWord(s string) (uint32, error) {
	if len(s) != 8 {
		return 0, fmt.Errorf("want 8 hex digits, got %q", s)
	}
	b, err := hex.DecodeString(s)
	if err != nil {
		return 0, err
	}
	// The text is the word's value, most significant digit first.
	return binary.BigEndian.Uint32(b), nil
}
