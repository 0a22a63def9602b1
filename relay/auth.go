package relay

import (
	"crypto/hmac"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// authenticator checks long-term credentials (RFC 8489 §9.2), static or TURN REST
// ephemeral ones, and issues stateless nonces.
type authenticator struct {
	realm    string
	secret   []byte
	keys     map[string][]byte // static users: user name to long-term key
	nonceKey [32]byte
	nonceTTL time.Duration
}

func newAuthenticator(cfg *Config) *authenticator {
	a := &authenticator{
		realm:    cfg.Realm,
		keys:     make(map[string][]byte, len(cfg.Users)),
		nonceTTL: cfg.NonceLifetime,
	}
	if cfg.Secret != "" {
		a.secret = []byte(cfg.Secret)
	}
	for u, p := range cfg.Users {
		a.keys[u] = longTermKey(u, a.realm, p)
	}
	if _, err := rand.Read(a.nonceKey[:]); err != nil {
		panic(err) // crypto/rand does not fail on supported platforms
	}
	return a
}

// longTermKey is MD5(user ":" realm ":" password), the HMAC key of RFC 8489 §9.2.2.
func longTermKey(user, realm, pass string) []byte {
	h := md5.Sum([]byte(user + ":" + realm + ":" + pass))
	return h[:]
}

// RESTPassword is the TURN REST password for a user name: base64 of HMAC-SHA1 keyed with
// the shared secret.
func RESTPassword(secret, user string) string {
	m := hmac.New(sha1.New, []byte(secret))
	m.Write([]byte(user))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// RESTCredentials returns TURN REST credentials valid until expiry for id (a node ID or
// any name), for a relay sharing secret: user name "expiry:id".
func RESTCredentials(secret, id string, expiry time.Time) (user, pass string) {
	user = strconv.FormatInt(expiry.Unix(), 10) + ":" + id
	return user, RESTPassword(secret, user)
}

// key returns the long-term key for a user name, or false when the user is unknown or
// its REST credential has expired.
func (a *authenticator) key(user string, now time.Time) ([]byte, bool) {
	if k, ok := a.keys[user]; ok {
		return k, true
	}
	if a.secret == nil {
		return nil, false
	}
	ts, _, _ := strings.Cut(user, ":")
	exp, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || exp < now.Unix() {
		return nil, false
	}
	return longTermKey(user, a.realm, RESTPassword(string(a.secret), user)), true
}

// Nonces are stateless: the issue time and a MAC over it and the client's IP, so a
// flood of unauthenticated requests costs the relay no memory.
const nonceMACLen = 12

func (a *authenticator) nonce(client netip.Addr, now time.Time) string {
	var b [8 + nonceMACLen]byte
	binary.BigEndian.PutUint64(b[:8], uint64(now.Unix()))
	copy(b[8:], a.nonceMAC(b[:8], client))
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func (a *authenticator) nonceMAC(ts []byte, client netip.Addr) []byte {
	m := hmac.New(sha256.New, a.nonceKey[:])
	m.Write(ts)
	ip := client.As16()
	m.Write(ip[:])
	return m.Sum(nil)[:nonceMACLen]
}

// nonceValid reports whether n is a nonce this relay issued to client and that has not
// gone stale.
func (a *authenticator) nonceValid(n string, client netip.Addr, now time.Time) bool {
	var b [8 + nonceMACLen]byte
	if base64.RawURLEncoding.DecodedLen(len(n)) != len(b) {
		return false
	}
	if _, err := base64.RawURLEncoding.Decode(b[:], []byte(n)); err != nil {
		return false
	}
	if !hmac.Equal(b[8:], a.nonceMAC(b[:8], client)) {
		return false
	}
	issued := time.Unix(int64(binary.BigEndian.Uint64(b[:8])), 0)
	return now.Sub(issued) < a.nonceTTL && !issued.After(now.Add(time.Minute))
}
