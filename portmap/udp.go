package portmap

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"
)

// exchange sends req to dst from a fresh socket and reads until answer accepts a
// datagram from dst, retransmitting on RFC 6886's schedule (250 ms, doubling). It gives
// up after wait, or when ctx ends, with an error wrapping ErrNotSupported when nothing
// came back: a gateway that ignores the protocol looks exactly like that.
func exchange(ctx context.Context, c cfg, dst netip.AddrPort, req []byte, wait time.Duration, answer func(b []byte) (bool, error)) error {
	conn, err := c.net.ListenPacket(ctx, "udp4", ":0")
	if err != nil {
		return fmt.Errorf("portmap: socket: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()

	to := net.UDPAddrFromAddrPort(dst)
	deadline := time.Now().Add(wait)
	rto := initialRTO
	buf := make([]byte, 2048)
	var lastErr error
	for {
		if _, err := conn.WriteTo(req, to); err != nil {
			return fmt.Errorf("portmap: sending to %v: %w", dst, err)
		}
		next := time.Now().Add(rto)
		if next.After(deadline) {
			next = deadline
		}
		rto *= 2
		conn.SetReadDeadline(next)
		for {
			n, from, err := conn.ReadFrom(buf)
			if err != nil {
				if cerr := ctx.Err(); cerr != nil {
					return cerr
				}
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					break
				}
				return fmt.Errorf("portmap: reading from %v: %w", dst, err)
			}
			src, ok := from.(*net.UDPAddr)
			if !ok || src.AddrPort().Addr().Unmap() != dst.Addr() || src.AddrPort().Port() != dst.Port() {
				// Only the gateway may answer (RFC 6886 section 3.1).
				continue
			}
			done, err := answer(buf[:n])
			if err != nil {
				// A garbled datagram may be followed by a good one; remember it in case
				// nothing better comes.
				lastErr = err
				if !done {
					continue
				}
				return err
			}
			if done {
				return nil
			}
		}
		if !time.Now().Before(deadline) {
			if lastErr != nil {
				return lastErr
			}
			return fmt.Errorf("%w: no answer from %v within %v", ErrNotSupported, dst, wait)
		}
	}
}
