// Package coturn runs Debian's coturn STUN server as a child process for comparisons.
package coturn

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"peerlink/nettype"
	"peerlink/stun"
)

// ErrNotInstalled means turnserver is not on PATH.
var ErrNotInstalled = errors.New("coturn: turnserver not found (install the Debian package coturn)")

// Options configure Start.
type Options struct {
	// IPs are the listening addresses; two of one family turn on RFC 5780.
	IPs []netip.Addr
	// Port is the primary port; AltPort the alternate one (coturn's default is Port+1).
	Port, AltPort uint16
	// Dir holds the configuration, log and pid files.
	Dir string
	// Extra are more configuration lines.
	Extra []string
	// Command builds the turnserver command; nil means exec.Command. A kernel-lab host's
	// Command runs it inside the host's network namespace.
	Command func(ctx context.Context, name string, arg ...string) *exec.Cmd
	// Net opens the socket that checks the server answers; nil means the host's
	// network. It must reach the server: in a lab, the lab host's own ListenPacket.
	Net nettype.PacketListener
}

// Server is a running turnserver.
type Server struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	Log  string // path of its log file
}

// Start runs turnserver in STUN-only mode and waits until it answers a Binding request
// on its first IP.
func Start(ctx context.Context, o Options) (*Server, error) {
	bin, err := exec.LookPath("turnserver")
	if err != nil {
		return nil, ErrNotInstalled
	}
	conf := []string{
		"listening-port=" + strconv.Itoa(int(o.Port)),
		"stun-only", "no-tls", "no-dtls", "no-cli", "no-auth", "simple-log", "no-stdout-log",
		"log-file=" + filepath.Join(o.Dir, "turnserver.log"),
		"pidfile=" + filepath.Join(o.Dir, "turnserver.pid"),
	}
	if o.AltPort != 0 {
		conf = append(conf, "alt-listening-port="+strconv.Itoa(int(o.AltPort)))
	}
	for _, ip := range o.IPs {
		conf = append(conf, "listening-ip="+ip.String())
	}
	conf = append(conf, o.Extra...)
	path := filepath.Join(o.Dir, "turnserver.conf")
	if err := os.WriteFile(path, []byte(strings.Join(conf, "\n")+"\n"), 0o644); err != nil {
		return nil, err
	}
	command := o.Command
	if command == nil {
		// Not CommandContext: the server outlives Start's ctx; Close stops it.
		command = func(_ context.Context, name string, arg ...string) *exec.Cmd { return exec.Command(name, arg...) }
	}
	s := &Server{cmd: command(context.Background(), bin, "-c", path), done: make(chan struct{}), Log: filepath.Join(o.Dir, "turnserver.log")}
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { s.err = s.cmd.Wait(); close(s.done) }()
	if err := s.waitReady(ctx, nettype.Or(o.Net), netip.AddrPortFrom(o.IPs[0], o.Port)); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Pid is the server's process ID.
func (s *Server) Pid() int { return s.cmd.Process.Pid }

func (s *Server) waitReady(ctx context.Context, nw nettype.PacketListener, addr netip.AddrPort) error {
	c, err := nw.ListenPacket(ctx, "udp", ":0")
	if err != nil {
		return err
	}
	defer c.Close()
	to := net.UDPAddrFromAddrPort(addr)
	buf := make([]byte, 1500)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		select {
		case <-s.done:
			return fmt.Errorf("coturn: turnserver exited: %v (log %s)", s.err, s.Log)
		default:
		}
		c.WriteTo(stun.AppendBindingRequest(nil, stun.NewTransactionID(), stun.RequestOptions{}), to)
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if n, _, err := c.ReadFrom(buf); err == nil {
			if _, err := stun.ParseBindingResponse(buf[:n]); err == nil {
				return nil
			}
		}
	}
	return fmt.Errorf("coturn: no answer on %v (log %s)", addr, s.Log)
}

// Close stops the server and waits for it to exit.
func (s *Server) Close() error {
	select {
	case <-s.done:
		return nil
	default:
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
	}
	return nil
}

// FreePorts returns a port P such that P and P+1 are free for UDP and TCP on every ip.
// Another process can still take them before they are used.
func FreePorts(ips ...netip.Addr) (uint16, error) {
	for range 100 {
		c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ips[0], 0)))
		if err != nil {
			return 0, err
		}
		p := c.LocalAddr().(*net.UDPAddr).AddrPort().Port()
		c.Close()
		if p < 65535 && free(ips, p) && free(ips, p+1) {
			return p, nil
		}
	}
	return 0, errors.New("coturn: no free port pair")
}

func free(ips []netip.Addr, p uint16) bool {
	for _, ip := range ips {
		ap := netip.AddrPortFrom(ip, p)
		u, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
		if err != nil {
			return false
		}
		u.Close()
		t, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap))
		if err != nil {
			return false
		}
		t.Close()
	}
	return true
}
