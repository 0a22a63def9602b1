package portmap

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"
)

// PCP (RFC 6887) wire format, MAP opcode only.
const (
	pcpVersion       = 2
	pcpOpMap         = 1
	pcpReplyBit      = 0x80
	pcpHeaderLen     = 24
	pcpMapLen        = 36
	pcpMaxLen        = 1100
	pcpProtoUDP      = 17
	pcpUnsuppVersion = 1
	pcpUnsuppOpcode  = 4

	pcpUnsuppProtocol = 9
)

var pcpResultNames = [...]string{
	"SUCCESS", "UNSUPP_VERSION", "NOT_AUTHORIZED", "MALFORMED_REQUEST", "UNSUPP_OPCODE",
	"UNSUPP_OPTION", "MALFORMED_OPTION", "NETWORK_FAILURE", "NO_RESOURCES", "UNSUPP_PROTOCOL",
	"USER_EX_QUOTA", "CANNOT_PROVIDE_EXTERNAL", "ADDRESS_MISMATCH", "EXCESSIVE_REMOTE_PEERS",
}

func pcpResultText(code uint8) string {
	if int(code) < len(pcpResultNames) {
		return pcpResultNames[code]
	}
	return "unknown"
}

// pcpMapRequest is a MAP request's fields.
type pcpMapRequest struct {
	Lifetime  uint32
	Client    netip.Addr
	Nonce     [12]byte
	Protocol  uint8
	Internal  uint16
	Suggested netip.AddrPort // the zero value asks for any
}

func (r pcpMapRequest) marshal() []byte {
	b := make([]byte, pcpHeaderLen+pcpMapLen)
	b[0] = pcpVersion
	b[1] = pcpOpMap
	binary.BigEndian.PutUint32(b[4:8], r.Lifetime)
	putAddr16(b[8:24], r.Client)
	m := b[pcpHeaderLen:]
	copy(m[0:12], r.Nonce[:])
	m[12] = r.Protocol
	binary.BigEndian.PutUint16(m[16:18], r.Internal)
	binary.BigEndian.PutUint16(m[18:20], r.Suggested.Port())
	sugg := r.Suggested.Addr()
	if !sugg.IsValid() {
		// RFC 6887 section 11.1: "any IPv4 address" is the IPv4-mapped ::ffff:0.0.0.0.
		sugg = netip.IPv4Unspecified()
	}
	putAddr16(m[20:36], sugg)
	return b
}

// putAddr16 writes a as 16 bytes, IPv4 as IPv4-mapped IPv6 (which As16 gives).
func putAddr16(b []byte, a netip.Addr) {
	if !a.IsValid() {
		a = netip.IPv4Unspecified()
	}
	x := a.As16()
	copy(b, x[:])
}

// pcpMapResponse is a MAP answer's fields.
type pcpMapResponse struct {
	Result   uint8
	Lifetime uint32
	Epoch    uint32
	Nonce    [12]byte
	Protocol uint8
	Internal uint16
	External netip.AddrPort
}

// parsePCPMap parses a MAP answer. A non-success result comes back as *ResultError
// together with what could be read. A NAT-PMP-only gateway answers a PCP request with
// a NAT-PMP "unsupported version" (version 0), which is reported as PCP's own
// UNSUPP_VERSION.
func parsePCPMap(b []byte) (pcpMapResponse, error) {
	var r pcpMapResponse
	if len(b) < 4 {
		return r, fmt.Errorf("%w: PCP answer of %d bytes", ErrMalformed, len(b))
	}
	if b[0] == natpmpVersion {
		// RFC 6887 section 9: a NAT-PMP server answers with result 1 in its own format.
		if len(b) >= 4 && b[1]&natpmpReply != 0 && binary.BigEndian.Uint16(b[2:4]) == natpmpResultBadVer {
			return r, &ResultError{Protocol: PCP, Code: pcpUnsuppVersion, Text: "gateway speaks NAT-PMP only"}
		}
		return r, fmt.Errorf("%w: PCP answer with version 0", ErrMalformed)
	}
	if b[0] != pcpVersion {
		if len(b) >= 4 && b[3] == pcpUnsuppVersion {
			return r, &ResultError{Protocol: PCP, Code: pcpUnsuppVersion, Text: fmt.Sprintf("gateway speaks PCP version %d", b[0])}
		}
		return r, fmt.Errorf("%w: PCP answer with version %d", ErrMalformed, b[0])
	}
	if b[1]&pcpReplyBit == 0 {
		return r, fmt.Errorf("%w: PCP request where an answer was expected", ErrMalformed)
	}
	if op := b[1] &^ pcpReplyBit; op != pcpOpMap {
		return r, fmt.Errorf("%w: PCP answer opcode %d, want MAP", ErrMalformed, op)
	}
	if len(b) < pcpHeaderLen {
		if b[3] != 0 {
			return r, &ResultError{Protocol: PCP, Code: int(b[3]), Text: pcpResultText(b[3])}
		}
		return r, fmt.Errorf("%w: PCP answer of %d bytes", ErrMalformed, len(b))
	}
	if len(b) > pcpMaxLen || len(b)%4 != 0 {
		return r, fmt.Errorf("%w: PCP answer of %d bytes (want a multiple of 4, at most %d)", ErrMalformed, len(b), pcpMaxLen)
	}
	r.Result = b[3]
	r.Lifetime = binary.BigEndian.Uint32(b[4:8])
	r.Epoch = binary.BigEndian.Uint32(b[8:12])
	if len(b) < pcpHeaderLen+pcpMapLen {
		if r.Result != 0 {
			return r, &ResultError{Protocol: PCP, Code: int(r.Result), Text: pcpResultText(r.Result)}
		}
		return r, fmt.Errorf("%w: PCP MAP answer of %d bytes, want %d", ErrMalformed, len(b), pcpHeaderLen+pcpMapLen)
	}
	m := b[pcpHeaderLen:]
	copy(r.Nonce[:], m[0:12])
	r.Protocol = m[12]
	r.Internal = binary.BigEndian.Uint16(m[16:18])
	ext := netip.AddrFrom16([16]byte(m[20:36])).Unmap()
	r.External = netip.AddrPortFrom(ext, binary.BigEndian.Uint16(m[18:20]))
	if r.Result != 0 {
		return r, &ResultError{Protocol: PCP, Code: int(r.Result), Text: pcpResultText(r.Result)}
	}
	return r, nil
}

// pcpClient maps one UDP port with PCP.
type pcpClient struct {
	cfg      cfg
	gateway  netip.Addr
	local    netip.Addr
	internal uint16
	// nonce identifies the mapping to the server across renewals and the delete.
	nonce [12]byte
}

func newPCPClient(c cfg, gw, local netip.Addr, port uint16) *pcpClient {
	p := &pcpClient{cfg: c, gateway: gw, local: local, internal: port}
	rand.Read(p.nonce[:])
	return p
}

func (c *pcpClient) describe() string { return "pcp" }

func (c *pcpClient) request(ctx context.Context, lifetime uint32, suggested netip.AddrPort) (pcpMapResponse, error) {
	req := pcpMapRequest{Lifetime: lifetime, Client: c.local, Nonce: c.nonce, Protocol: pcpProtoUDP, Internal: c.internal, Suggested: suggested}
	var resp pcpMapResponse
	err := exchange(ctx, c.cfg, netip.AddrPortFrom(c.gateway, natpmpPort), req.marshal(), c.cfg.Timeout, func(b []byte) (bool, error) {
		r, err := parsePCPMap(b)
		if re, ok := err.(*ResultError); ok {
			// Errors that echo the request must be ours; short ones cannot be checked.
			if r.Nonce != ([12]byte{}) && r.Nonce != c.nonce {
				return false, nil
			}
			return true, re
		}
		if err != nil {
			return false, err
		}
		if r.Nonce != c.nonce || r.Protocol != pcpProtoUDP || r.Internal != c.internal {
			return false, nil // RFC 6887 section 11.4: not an answer to this request
		}
		resp = r
		return true, nil
	})
	return resp, err
}

func (c *pcpClient) mapPort(ctx context.Context, prev *grant) (grant, error) {
	suggested := netip.AddrPortFrom(netip.Addr{}, c.internal)
	if prev != nil {
		suggested = prev.external
	}
	secs := uint32(min(c.cfg.Lifetime/time.Second, 1<<32-1))
	r, err := c.request(ctx, secs, suggested)
	if err != nil {
		return grant{}, err
	}
	if r.External.Port() == 0 || !r.External.Addr().IsValid() || r.External.Addr().IsUnspecified() || r.Lifetime == 0 {
		return grant{}, fmt.Errorf("%w: PCP granted %v for %d s", ErrMalformed, r.External, r.Lifetime)
	}
	return grant{external: r.External, lifetime: time.Duration(r.Lifetime) * time.Second}, nil
}

// unmap deletes the mapping: the same nonce with lifetime 0 (RFC 6887 section 15).
func (c *pcpClient) unmap(ctx context.Context) error {
	_, err := c.request(ctx, 0, netip.AddrPort{})
	return err
}
