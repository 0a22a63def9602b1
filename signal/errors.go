package signal

import (
	"errors"
	"fmt"

	"peerlink/party"
)

// Code is an error code on the wire. docs/protocol.md lists them all.
type Code string

// Error codes.
const (
	CodeMalformed       Code = "malformed"        // not JSON, or not a valid frame or message
	CodeUnsupported     Code = "unsupported"      // unknown message type
	CodeTooLarge        Code = "too_large"        // frame over the limit (close 1009)
	CodeUnauthenticated Code = "unauthenticated"  // a request before auth
	CodeAuthFailed      Code = "auth_failed"      // the challenge signature does not verify
	CodeAuthTimeout     Code = "auth_timeout"     // no auth in time
	CodeBadSignature    Code = "bad_signature"    // a message's signature does not verify
	CodeSpoofed         Code = "spoofed_sender"   // fromNodeID is not the connection's node
	CodeStale           Code = "stale"            // timestamp outside the allowed skew
	CodeReplay          Code = "replay"           // a nonce seen before
	CodeWrongRecipient  Code = "wrong_recipient"  // toNodeID is not the receiver (receiver side)
	CodePeerOffline     Code = "peer_offline"     // the target is not connected
	CodeNotFound        Code = "not_found"        // lookup of a node never seen
	CodeInvalid         Code = "invalid"          // well-formed but unacceptable values
	CodeRateLimited     Code = "rate_limited"     // over the per-connection frame rate
	CodeTooManyErrors   Code = "too_many_errors"  // too many bad frames: the server closes
	CodeOverloaded      Code = "overloaded"       // the target's queue is full
	CodeTURNUnavailable Code = "turn_unavailable" // the server has no TURN secret
	CodeServerFull      Code = "server_full"      // the server's client limit is reached
	CodeReplaced        Code = "replaced"         // the node connected again elsewhere on this server
	CodeShuttingDown    Code = "shutting_down"    // the server is stopping
	CodeInternal        Code = "internal"         // a server fault (store unreachable, ...)

	// Relay sessions (docs/protocol.md section 12).
	CodeRelayRefused     Code = "relay_refused"     // the target refused the session
	CodeRelayTimeout     Code = "relay_timeout"     // the target did not answer in time
	CodeRelayClosed      Code = "relay_closed"      // the peer closed the session or left
	CodeRelayFlood       Code = "relay_flood"       // far over the bandwidth limit: session closed
	CodeUnknownSession   Code = "unknown_session"   // a relay frame or request for a session never opened
	CodeTooManySessions  Code = "too_many_sessions" // the connection's session limit is reached
	CodeRelayUnavailable Code = "relay_unavailable" // the server does not relay

	// Parties (docs/protocol.md section 13). Each matches one of package party's
	// errors with errors.Is.
	CodeBadPartyName    Code = "bad_party_name"   // party.ErrBadName
	CodePartyFull       Code = "party_full"       // party.ErrPartyFull
	CodeInviteMalformed Code = "invite_malformed" // party.ErrInviteMalformed
	CodeInviteForged    Code = "invite_forged"    // party.ErrInviteForged: bad signature, or signer not a member
	CodeInviteExpired   Code = "invite_expired"   // party.ErrInviteExpired
	CodeNoParty         Code = "no_party"         // party.ErrNoParty
	CodePartyExists     Code = "party_exists"     // party.ErrPartyExists
	CodeNotMember       Code = "not_member"       // party.ErrNotMember
	CodeNotOwner        Code = "not_owner"        // party.ErrNotOwner
	CodeNotShared       Code = "not_shared"       // party.ErrNotShared: no party in common with the target
	CodeTooManyParties  Code = "too_many_parties" // the node is in the server's maximum of parties
)

// partyCodes pairs party's errors with their codes.
var partyCodes = []struct {
	code Code
	err  error
}{
	{CodeBadPartyName, party.ErrBadName},
	{CodePartyFull, party.ErrPartyFull},
	{CodeInviteMalformed, party.ErrInviteMalformed},
	{CodeInviteForged, party.ErrInviteForged},
	{CodeInviteExpired, party.ErrInviteExpired},
	{CodeNoParty, party.ErrNoParty},
	{CodePartyExists, party.ErrPartyExists},
	{CodeNotMember, party.ErrNotMember},
	{CodeNotOwner, party.ErrNotOwner},
	{CodeNotShared, party.ErrNotShared},
}

// partyError turns one of party's errors into a protocol error carrying its text; ok is
// false for other errors.
func partyError(err error) (*Error, bool) {
	for _, pc := range partyCodes {
		if errors.Is(err, pc.err) {
			return &Error{Code: pc.code, Message: err.Error()}, true
		}
	}
	return nil, false
}

// Error is a protocol error: a code and a human-readable message. errors.Is matches any
// two *Errors with the same code, so errors.Is(err, ErrPeerOffline) holds for every
// peer_offline the server sends.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message,omitempty"`
}

func (e *Error) Error() string {
	if e.Message == "" {
		return "signal: " + string(e.Code)
	}
	return "signal: " + string(e.Code) + ": " + e.Message
}

// Is reports whether target is an *Error with the same code, or the error of package
// party that e's code stands for (so errors.Is(err, party.ErrInviteExpired) holds for an
// invite_expired answer).
func (e *Error) Is(target error) bool {
	if t, ok := target.(*Error); ok {
		return t.Code == e.Code
	}
	for _, pc := range partyCodes {
		if pc.code == e.Code {
			return target == pc.err
		}
	}
	return false
}

func errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Sentinel errors, one per code that callers act on.
var (
	ErrMalformed       = &Error{Code: CodeMalformed}
	ErrUnsupported     = &Error{Code: CodeUnsupported}
	ErrTooLarge        = &Error{Code: CodeTooLarge}
	ErrUnauthenticated = &Error{Code: CodeUnauthenticated}
	ErrAuthFailed      = &Error{Code: CodeAuthFailed}
	ErrAuthTimeout     = &Error{Code: CodeAuthTimeout}
	ErrBadSignature    = &Error{Code: CodeBadSignature}
	ErrSpoofed         = &Error{Code: CodeSpoofed}
	ErrStale           = &Error{Code: CodeStale}
	ErrReplay          = &Error{Code: CodeReplay}
	ErrWrongRecipient  = &Error{Code: CodeWrongRecipient}
	ErrPeerOffline     = &Error{Code: CodePeerOffline}
	ErrNotFound        = &Error{Code: CodeNotFound}
	ErrInvalid         = &Error{Code: CodeInvalid}
	ErrRateLimited     = &Error{Code: CodeRateLimited}
	ErrTooManyErrors   = &Error{Code: CodeTooManyErrors}
	ErrOverloaded      = &Error{Code: CodeOverloaded}
	ErrTURNUnavailable = &Error{Code: CodeTURNUnavailable}
	ErrServerFull      = &Error{Code: CodeServerFull}
	ErrReplaced        = &Error{Code: CodeReplaced}
	ErrShuttingDown    = &Error{Code: CodeShuttingDown}
	ErrInternal        = &Error{Code: CodeInternal}

	ErrRelayRefused     = &Error{Code: CodeRelayRefused}
	ErrRelayTimeout     = &Error{Code: CodeRelayTimeout}
	ErrRelayClosed      = &Error{Code: CodeRelayClosed}
	ErrRelayFlood       = &Error{Code: CodeRelayFlood}
	ErrUnknownSession   = &Error{Code: CodeUnknownSession}
	ErrTooManySessions  = &Error{Code: CodeTooManySessions}
	ErrRelayUnavailable = &Error{Code: CodeRelayUnavailable}

	ErrTooManyParties = &Error{Code: CodeTooManyParties}
)

// ErrClosed is returned by a Client's methods after Close.
var ErrClosed = errors.New("signal: client closed")
