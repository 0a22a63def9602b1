package signal

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"peerlink/nat"
)

// ConnectionInfo is how to reach a node: the body of offer, answer and publish. The
// first five fields are the classic connectionInfo; Profile carries the full NAT
// profile and Candidates the node's candidates.
type ConnectionInfo struct {
	PublicIP   netip.Addr   `json:"publicIP,omitzero"`
	PublicPort uint16       `json:"publicPort,omitempty"`
	LocalIP    netip.Addr   `json:"localIP,omitzero"`
	LocalPort  uint16       `json:"localPort,omitempty"`
	NATType    nat.Classic  `json:"natType"`
	Profile    *nat.Profile `json:"profile,omitempty"`
	Candidates []Candidate  `json:"candidates,omitempty"`
	// WGPublicKey is the node's WireGuard (Curve25519) public key in 64 hex digits, for
	// party networks; empty when the node runs none.
	WGPublicKey string `json:"wgPublicKey,omitempty"`
}

// NewConnectionInfo fills a ConnectionInfo from a detected profile, the local address of
// the socket it describes and the node's candidates.
func NewConnectionInfo(p nat.Profile, local netip.AddrPort, cands []Candidate) ConnectionInfo {
	return ConnectionInfo{
		PublicIP:   p.PublicIP,
		PublicPort: p.PublicPort,
		LocalIP:    local.Addr(),
		LocalPort:  local.Port(),
		NATType:    p.Classic(),
		Profile:    &p,
		Candidates: cands,
	}
}

// UnmarshalJSON decodes the wire form. natType is matched without regard to case, so
// both "fullCone" and "fullcone" are read.
func (ci *ConnectionInfo) UnmarshalJSON(b []byte) error {
	type plain ConnectionInfo
	w := struct {
		*plain
		NATType string `json:"natType"` // shadows plain.NATType
	}{plain: (*plain)(ci)}
	if err := json.Unmarshal(b, &w); err != nil {
		return err
	}
	c, err := parseClassic(w.NATType)
	if err != nil {
		return err
	}
	ci.NATType = c
	return nil
}

// parseClassic parses a classic NAT name. It does not use nat.Classic's UnmarshalText,
// which lower-cases its input before comparing it with camel-case names and so rejects
// "fullCone".
func parseClassic(s string) (nat.Classic, error) {
	if s == "" {
		return nat.ClassicUnknown, nil
	}
	for c := nat.ClassicUnknown; c <= nat.ClassicUDPBlocked; c++ {
		if strings.EqualFold(c.String(), s) {
			return c, nil
		}
	}
	return nat.ClassicUnknown, fmt.Errorf("signal: unknown natType %.32q", s)
}

func (ci *ConnectionInfo) validate() error {
	if ci.WGPublicKey != "" {
		if k, err := hex.DecodeString(ci.WGPublicKey); err != nil || len(k) != 32 {
			return errorf(CodeInvalid, "wgPublicKey must be 64 hex digits (a Curve25519 public key)")
		}
	}
	if len(ci.Candidates) > MaxCandidates {
		return errorf(CodeInvalid, "%d candidates, at most %d", len(ci.Candidates), MaxCandidates)
	}
	for i := range ci.Candidates {
		if err := ci.Candidates[i].validate(); err != nil {
			return err
		}
	}
	return nil
}

// CandidateType is an ICE candidate type.
type CandidateType uint8

// Candidate types. The zero value is not a valid type.
const (
	CandidateHost CandidateType = iota + 1
	CandidateSrflx
	CandidatePrflx
	CandidateRelayed
)

var candidateNames = map[string]CandidateType{
	"host": CandidateHost, "srflx": CandidateSrflx, "prflx": CandidatePrflx, "relayed": CandidateRelayed,
	// Long forms some implementations send.
	"serverreflexive": CandidateSrflx, "peerreflexive": CandidatePrflx, "relay": CandidateRelayed,
}

func (t CandidateType) String() string {
	switch t {
	case CandidateHost:
		return "host"
	case CandidateSrflx:
		return "srflx"
	case CandidatePrflx:
		return "prflx"
	case CandidateRelayed:
		return "relayed"
	}
	return fmt.Sprintf("CandidateType(%d)", uint8(t))
}

// MarshalText returns "host", "srflx", "prflx" or "relayed".
func (t CandidateType) MarshalText() ([]byte, error) {
	if t < CandidateHost || t > CandidateRelayed {
		return nil, fmt.Errorf("signal: invalid candidate type %d", t)
	}
	return []byte(t.String()), nil
}

// UnmarshalText parses a candidate type, also accepting serverReflexive, peerReflexive
// and relay.
func (t *CandidateType) UnmarshalText(b []byte) error {
	v, ok := candidateNames[strings.ToLower(string(b))]
	if !ok {
		return fmt.Errorf("signal: candidate type %.32q (want host, srflx, prflx or relayed)", b)
	}
	*t = v
	return nil
}

// typePreference is RFC 8445's recommended type preference.
func (t CandidateType) typePreference() uint32 {
	switch t {
	case CandidateHost:
		return 126
	case CandidatePrflx:
		return 110
	case CandidateSrflx:
		return 100
	}
	return 0
}

// CandidatePriority is the RFC 8445 priority of a component-1 candidate of type t with
// the given local preference (65535 for a host's only address).
func CandidatePriority(t CandidateType, localPref uint16) uint32 {
	return t.typePreference()<<24 | uint32(localPref)<<8 | (256 - 1)
}

// Candidate is one address a peer may be reachable at: the body of iceCandidate and an
// element of ConnectionInfo.Candidates.
type Candidate struct {
	Type     CandidateType `json:"type"`
	IP       netip.Addr    `json:"ip"`
	Port     uint16        `json:"port"`
	Priority uint32        `json:"priority"`
	// Transport is "udp" (the default when empty) or "tcp".
	Transport string `json:"transport,omitempty"`
}

// AddrPort returns the candidate's address.
func (c Candidate) AddrPort() netip.AddrPort { return netip.AddrPortFrom(c.IP, c.Port) }

func (c *Candidate) validate() error {
	switch {
	case c.Type < CandidateHost || c.Type > CandidateRelayed:
		return errorf(CodeInvalid, "candidate without a type")
	case !c.IP.IsValid() || c.IP.IsUnspecified():
		return errorf(CodeInvalid, "candidate without an IP")
	case c.Port == 0:
		return errorf(CodeInvalid, "candidate without a port")
	case c.Transport != "" && c.Transport != "udp" && c.Transport != "tcp":
		return errorf(CodeInvalid, "candidate transport %.16q (want udp or tcp)", c.Transport)
	}
	return nil
}

// Punch coordinates a hole-punching attempt: which technique, when both sides start,
// and where to send.
type Punch struct {
	Technique nat.Technique
	// StartAt is when both sides begin sending (milliseconds on the wire); each side
	// maps it onto its own clock, so it should be a second or more ahead.
	StartAt time.Time
	// Addresses are where the receiver should send probes.
	Addresses []netip.AddrPort
	// PortDelta is the predicted step between the sender's consecutive mappings
	// (port-contiguity prediction).
	PortDelta int
	// Sockets is how many sockets the hard side opens (birthday probing).
	Sockets int
	// Probes is how many probes the easy side sends (birthday probing).
	Probes int
	// Interval is the gap between probes.
	Interval time.Duration
	// Attempt numbers retries within the session, from 1.
	Attempt int
}

type punchWire struct {
	Technique  nat.Technique    `json:"technique"`
	StartAt    int64            `json:"startAt"`
	Addresses  []netip.AddrPort `json:"addresses"`
	PortDelta  int              `json:"portDelta,omitempty"`
	Sockets    int              `json:"sockets,omitempty"`
	Probes     int              `json:"probes,omitempty"`
	IntervalMS int64            `json:"intervalMs,omitempty"`
	Attempt    int              `json:"attempt,omitempty"`
}

// MarshalJSON encodes times as milliseconds.
func (p Punch) MarshalJSON() ([]byte, error) {
	return json.Marshal(punchWire{p.Technique, p.StartAt.UnixMilli(), p.Addresses, p.PortDelta, p.Sockets, p.Probes, p.Interval.Milliseconds(), p.Attempt})
}

// UnmarshalJSON decodes the wire form.
func (p *Punch) UnmarshalJSON(b []byte) error {
	var w punchWire
	if err := json.Unmarshal(b, &w); err != nil {
		return err
	}
	*p = Punch{w.Technique, time.UnixMilli(w.StartAt), w.Addresses, w.PortDelta, w.Sockets, w.Probes, time.Duration(w.IntervalMS) * time.Millisecond, w.Attempt}
	return nil
}

func (p *Punch) validate() error {
	switch {
	case p.Technique == nat.TechniqueNone:
		return errorf(CodeInvalid, "punch without a technique")
	case p.StartAt.UnixMilli() <= 0:
		return errorf(CodeInvalid, "punch without startAt")
	case len(p.Addresses) > MaxAddresses:
		return errorf(CodeInvalid, "%d punch addresses, at most %d", len(p.Addresses), MaxAddresses)
	case p.Sockets < 0 || p.Probes < 0 || p.Interval < 0 || p.Attempt < 0 || p.Sockets > 65535 || p.Probes > 65535:
		return errorf(CodeInvalid, "punch counts out of range")
	}
	for _, a := range p.Addresses {
		if !a.IsValid() || a.Port() == 0 {
			return errorf(CodeInvalid, "punch address %v is not ip:port", a)
		}
	}
	return nil
}

// Bye ends a session.
type Bye struct {
	Reason string `json:"reason,omitempty"`
}

func validateBody(v any) error {
	switch b := v.(type) {
	case *ConnectionInfo:
		return b.validate()
	case *Candidate:
		return b.validate()
	case *Punch:
		return b.validate()
	case *Bye:
		if len(b.Reason) > MaxReasonLen {
			return errorf(CodeInvalid, "bye reason longer than %d bytes", MaxReasonLen)
		}
	}
	return nil
}
