package signal

import (
	"crypto/hmac"
	"crypto/sha1"
	"encoding/base64"
	"encoding/json"
	"strconv"
	"strings"
	"time"

	"peerlink/identity"
	"peerlink/relayreg"
)

// Bodies of the unsigned frames; docs/protocol.md describes each.

type challengeBody struct {
	Nonce      string  `json:"nonce"`
	ServerTime int64   `json:"serverTime"`
	MaxFrame   int     `json:"maxFrame"`
	RateLimit  float64 `json:"rateLimit"`
	RateBurst  int     `json:"rateBurst"`
	MaxSkewMS  int64   `json:"maxSkewMs"`
}

type authBody struct {
	NodeID    string `json:"nodeID"`
	Host      string `json:"host"`
	Signature string `json:"signature"`
}

type welcomeBody struct {
	NodeID     string `json:"nodeID"`
	ServerTime int64  `json:"serverTime"`
}

type lookupBody struct {
	NodeID string `json:"nodeID"`
}

type peerBody struct {
	NodeID    string          `json:"nodeID"`
	Online    bool            `json:"online"`
	LastSeen  int64           `json:"lastSeen,omitempty"`
	Published json.RawMessage `json:"published,omitempty"`
}

type relayRegisterBody struct {
	Endpoints []relayreg.Endpoint `json:"endpoints"`
	Capacity  int                 `json:"capacity"`
	Load      int                 `json:"load"`
}

type relaysBody struct {
	Relays []relayreg.Info `json:"relays"`
}

// partyNameBody is the body of partyCreate, partyLeave and partyGet.
type partyNameBody struct {
	Name string `json:"name"`
}

type partyJoinBody struct {
	Invite string `json:"invite"`
}

type partyKickBody struct {
	Name   string `json:"name"`
	NodeID string `json:"nodeID"`
}

type partiesBody struct {
	Names []string `json:"names"`
}

// presenceRecord is what the server keeps in the store's Presence bucket.
type presenceRecord struct {
	LastSeen int64 `json:"lastSeen"`
}

// AuthSigningInput returns what a client signs to answer a challenge: a version line,
// then the host it dialled, the challenge nonce and its NodeID, separated by newlines.
// Signing the host stops a hostile server from passing its challenge on to another
// server to log in there as the client.
func AuthSigningInput(host, nonce string, node identity.NodeID) []byte {
	b := make([]byte, 0, 17+len(host)+len(nonce)+identity.TextLen+2)
	b = append(b, "peerlink/auth/v1\n"...)
	b = append(b, host...)
	b = append(b, '\n')
	b = append(b, nonce...)
	b = append(b, '\n')
	return node.AppendText(b)
}

// Peer is what Lookup returns about a node.
type Peer struct {
	NodeID identity.NodeID
	// Online is true while the node is connected to a rendezvous server.
	Online bool
	// LastSeen is when the node last connected or disconnected; zero if never.
	LastSeen time.Time
	// Info is the node's last published connection information, with its signature
	// verified; nil if it never published or the record expired.
	Info *ConnectionInfo
	// Published is when the node signed Info.
	Published time.Time
}

// TURNCredentials are short-lived TURN REST credentials. Username is "expiry:nodeID"
// (expiry in Unix seconds) and Password is base64(HMAC-SHA1(secret, Username)), the scheme
// coturn's use-auth-secret and peerlink's relay accept.
type TURNCredentials struct {
	Username string `json:"username"`
	Password string `json:"password"`
	// TTL is how long the credentials last from issue, in seconds on the wire.
	TTL time.Duration `json:"-"`
	// URIs are the TURN servers to use them with, as configured on the server.
	URIs []string `json:"uris,omitempty"`
}

type turnWire struct {
	Username string   `json:"username"`
	Password string   `json:"password"`
	TTL      int64    `json:"ttl"`
	URIs     []string `json:"uris,omitempty"`
}

// MarshalJSON encodes the TURN REST API response form ({username, password, ttl, uris}).
func (c TURNCredentials) MarshalJSON() ([]byte, error) {
	return json.Marshal(turnWire{c.Username, c.Password, int64(c.TTL / time.Second), c.URIs})
}

// UnmarshalJSON decodes the TURN REST API response form.
func (c *TURNCredentials) UnmarshalJSON(b []byte) error {
	var w turnWire
	if err := json.Unmarshal(b, &w); err != nil {
		return err
	}
	*c = TURNCredentials{w.Username, w.Password, time.Duration(w.TTL) * time.Second, w.URIs}
	return nil
}

// Expiry returns the expiry time encoded in Username, or zero if it has none.
func (c TURNCredentials) Expiry() time.Time {
	s, _, ok := strings.Cut(c.Username, ":")
	if !ok {
		return time.Time{}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}
	}
	return time.Unix(n, 0)
}

// NewTURNCredentials issues TURN REST credentials for node, valid until now+ttl.
func NewTURNCredentials(secret string, node identity.NodeID, now time.Time, ttl time.Duration) TURNCredentials {
	user := strconv.FormatInt(now.Add(ttl).Unix(), 10) + ":" + node.String()
	return TURNCredentials{Username: user, Password: TURNPassword(secret, user), TTL: ttl}
}

// TURNPassword is base64(HMAC-SHA1(secret, username)).
func TURNPassword(secret, username string) string {
	h := hmac.New(sha1.New, []byte(secret))
	h.Write([]byte(username))
	return base64.StdEncoding.EncodeToString(h.Sum(nil))
}
