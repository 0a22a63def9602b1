package portmap

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"
)

// NAT-PMP (RFC 6886) wire format.
const (
	natpmpPort            = 5351
	natpmpVersion         = 0
	natpmpOpAddress       = 0
	natpmpOpMapUDP        = 1
	natpmpOpMapTCP        = 2
	natpmpReply           = 128
	natpmpAddressRespLen  = 12
	natpmpMapRespLen      = 16
	natpmpResultSuccess   = 0
	natpmpResultBadVer    = 1
	natpmpResultRefused   = 2
	natpmpResultNetFail   = 3
	natpmpResultNoRes     = 4
	natpmpResultBadOpcode = 5
)

// ResultError is a gateway's non-success result code. It wraps ErrNotSupported for
// "unsupported version/opcode" answers and ErrRefused for the rest.
type ResultError struct {
	Protocol Protocol
	// Code is the protocol's own result code (for UPnP, the SOAP errorCode).
	Code int
	// Text is the code's name, or the UPnP errorDescription.
	Text string
}

func (e *ResultError) Error() string {
	return fmt.Sprintf("portmap: %v gateway answered %d (%s)", e.Protocol, e.Code, e.Text)
}

// Unwrap sorts the code into ErrNotSupported or ErrRefused.
func (e *ResultError) Unwrap() error {
	switch {
	case e.Protocol == NATPMP && (e.Code == natpmpResultBadVer || e.Code == natpmpResultBadOpcode),
		e.Protocol == PCP && (e.Code == pcpUnsuppVersion || e.Code == pcpUnsuppOpcode || e.Code == pcpUnsuppProtocol),
		e.Protocol == UPnP && (e.Code == upnpInvalidAction || e.Code == upnpOptionalNotImplemented):
		return ErrNotSupported
	}
	return ErrRefused
}

func natpmpResultText(code uint16) string {
	switch code {
	case natpmpResultSuccess:
		return "success"
	case natpmpResultBadVer:
		return "unsupported version"
	case natpmpResultRefused:
		return "not authorized/refused"
	case natpmpResultNetFail:
		return "network failure"
	case natpmpResultNoRes:
		return "out of resources"
	case natpmpResultBadOpcode:
		return "unsupported opcode"
	}
	return "unknown"
}

// natpmpAddressResponse is the answer to opcode 0.
type natpmpAddressResponse struct {
	Epoch    uint32
	External netip.Addr
}

// natpmpMapResponse is the answer to a mapping request.
type natpmpMapResponse struct {
	Op       uint8 // the request's opcode
	Epoch    uint32
	Internal uint16
	External uint16
	Lifetime uint32 // seconds
}

// natpmpHeader checks version, reply bit and result code common to every answer. A
// non-success result comes back as *ResultError.
func natpmpHeader(b []byte, op uint8, size int) error {
	if len(b) < 4 {
		return fmt.Errorf("%w: NAT-PMP answer of %d bytes", ErrMalformed, len(b))
	}
	if b[0] != natpmpVersion {
		return fmt.Errorf("%w: NAT-PMP answer with version %d", ErrMalformed, b[0])
	}
	if b[1] != natpmpReply+op {
		return fmt.Errorf("%w: NAT-PMP answer opcode %d, want %d", ErrMalformed, b[1], natpmpReply+op)
	}
	if code := binary.BigEndian.Uint16(b[2:4]); code != natpmpResultSuccess {
		// Error answers may be cut short (RFC 6886 section 3.5 lets them carry only the
		// header and epoch), so the code is trusted before the length.
		return &ResultError{Protocol: NATPMP, Code: int(code), Text: natpmpResultText(code)}
	}
	if len(b) < size {
		return fmt.Errorf("%w: NAT-PMP answer of %d bytes, want %d", ErrMalformed, len(b), size)
	}
	return nil
}

func parseNATPMPAddress(b []byte) (natpmpAddressResponse, error) {
	if err := natpmpHeader(b, natpmpOpAddress, natpmpAddressRespLen); err != nil {
		return natpmpAddressResponse{}, err
	}
	return natpmpAddressResponse{
		Epoch:    binary.BigEndian.Uint32(b[4:8]),
		External: netip.AddrFrom4([4]byte(b[8:12])),
	}, nil
}

func parseNATPMPMap(b []byte, op uint8) (natpmpMapResponse, error) {
	if op != natpmpOpMapUDP && op != natpmpOpMapTCP {
		return natpmpMapResponse{}, fmt.Errorf("portmap: NAT-PMP opcode %d is no mapping", op)
	}
	if err := natpmpHeader(b, op, natpmpMapRespLen); err != nil {
		return natpmpMapResponse{}, err
	}
	return natpmpMapResponse{
		Op:       op,
		Epoch:    binary.BigEndian.Uint32(b[4:8]),
		Internal: binary.BigEndian.Uint16(b[8:10]),
		External: binary.BigEndian.Uint16(b[10:12]),
		Lifetime: binary.BigEndian.Uint32(b[12:16]),
	}, nil
}

func natpmpMapRequest(internal, suggested uint16, lifetime uint32) []byte {
	b := make([]byte, 12)
	b[0] = natpmpVersion
	b[1] = natpmpOpMapUDP
	binary.BigEndian.PutUint16(b[4:6], internal)
	binary.BigEndian.PutUint16(b[6:8], suggested)
	binary.BigEndian.PutUint32(b[8:12], lifetime)
	return b
}

// natpmpClient maps one UDP port with NAT-PMP.
type natpmpClient struct {
	cfg      cfg
	gateway  netip.Addr
	internal uint16
}

func (c *natpmpClient) describe() string { return "nat-pmp" }

func (c *natpmpClient) server() netip.AddrPort { return netip.AddrPortFrom(c.gateway, natpmpPort) }

// externalAddress asks the gateway for its external address (opcode 0).
func (c *natpmpClient) externalAddress(ctx context.Context) (natpmpAddressResponse, error) {
	var resp natpmpAddressResponse
	err := exchange(ctx, c.cfg, c.server(), []byte{natpmpVersion, natpmpOpAddress}, c.cfg.Timeout, func(b []byte) (bool, error) {
		r, err := parseNATPMPAddress(b)
		if err != nil {
			_, final := err.(*ResultError)
			return final, err
		}
		resp = r
		return true, nil
	})
	return resp, err
}

func (c *natpmpClient) request(ctx context.Context, suggested uint16, lifetime uint32) (natpmpMapResponse, error) {
	var resp natpmpMapResponse
	err := exchange(ctx, c.cfg, c.server(), natpmpMapRequest(c.internal, suggested, lifetime), c.cfg.Timeout, func(b []byte) (bool, error) {
		r, err := parseNATPMPMap(b, natpmpOpMapUDP)
		if err != nil {
			_, final := err.(*ResultError)
			return final, err
		}
		if r.Internal != c.internal {
			return false, nil // an answer to someone else's request
		}
		resp = r
		return true, nil
	})
	return resp, err
}

func (c *natpmpClient) mapPort(ctx context.Context, prev *grant) (grant, error) {
	// The address first: a gateway without an external address (or without NAT-PMP)
	// says so here.
	addr, err := c.externalAddress(ctx)
	if err != nil {
		return grant{}, err
	}
	suggested := c.internal
	if prev != nil {
		suggested = prev.external.Port()
	}
	secs := uint32(min(c.cfg.Lifetime/time.Second, 1<<32-1))
	r, err := c.request(ctx, suggested, secs)
	if err != nil {
		return grant{}, err
	}
	if r.External == 0 || r.Lifetime == 0 {
		return grant{}, fmt.Errorf("%w: NAT-PMP granted port %d for %d s", ErrMalformed, r.External, r.Lifetime)
	}
	if !addr.External.IsValid() || addr.External.IsUnspecified() {
		return grant{}, fmt.Errorf("%w: NAT-PMP gateway has no external address", ErrRefused)
	}
	return grant{
		external: netip.AddrPortFrom(addr.External, r.External),
		lifetime: time.Duration(r.Lifetime) * time.Second,
	}, nil
}

// unmap deletes the mapping: lifetime 0 and suggested port 0 (RFC 6886 section 3.4).
func (c *natpmpClient) unmap(ctx context.Context) error {
	_, err := c.request(ctx, 0, 0)
	return err
}
