// Package natsstore is the rendezvous store on NATS: JetStream key-value buckets (with
// TTL) hold profiles, presence, relays and parties, and NATS subjects carry signaling between
// rendezvous servers, so peers attached to different servers can reach each other.
package natsstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"peerlink/store"
)

// Config configures a Store. Either URL or Conn must be set.
type Config struct {
	// URL is one or more NATS server URLs, comma separated
	// ("nats://a:4222,nats://b:4222"). Give every server of a cluster so the store can
	// fail over when one dies.
	URL string
	// Options are extra connection options for URL (credentials, TLS, ...).
	Options []nats.Option
	// Conn is an existing connection to use instead of URL. The store does not close it.
	Conn *nats.Conn

	// Prefix starts every subject and bucket name; zero means "peerlink". Servers that
	// should share state use the same prefix.
	Prefix string
	// TTLs of the buckets; zero fields take store's defaults. Buckets that already
	// exist are updated to these TTLs.
	TTLs store.TTLs
	// Replicas is the JetStream replication factor of the buckets; zero means 1. Use 3
	// on a three-node cluster to survive losing a node.
	Replicas int
	// Timeout bounds each routing request and each bucket setup attempt; zero means
	// 5 s.
	Timeout time.Duration
	// Logger receives connection events; nil means quiet.
	Logger *slog.Logger
}

// Store is a store.Store on NATS.
type Store struct {
	cfg     Config
	nc      *nats.Conn
	ownConn bool
	kv      map[store.Bucket]jetstream.KeyValue
	subject string // prefix for node subjects, ending in "."
	log     *slog.Logger

	msgs chan *nats.Msg
	done chan struct{}
	wg   sync.WaitGroup

	mu     sync.Mutex
	routes map[string]*route
	closed bool
}

type route struct {
	h   store.Handler
	sub *nats.Subscription
}

var _ store.Store = (*Store)(nil)

// Header names of routed requests and their replies.
const (
	hdrOp     = "Peerlink-Op"     // "deliver" (default) or "ping"
	hdrStatus = "Peerlink-Status" // "ok", "no_route" or "rejected"
	hdrReason = "Peerlink-Reason" // the rejection reason
)

// New connects (when cfg.Conn is nil) and creates or updates the buckets. It retries
// bucket setup until ctx is done, because a fresh JetStream cluster needs a moment to
// elect a leader.
func New(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = "peerlink"
	}
	if cfg.Replicas <= 0 {
		cfg.Replicas = 1
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Store{
		cfg:     cfg,
		nc:      cfg.Conn,
		subject: cfg.Prefix + ".node.",
		log:     log,
		kv:      make(map[store.Bucket]jetstream.KeyValue),
		msgs:    make(chan *nats.Msg, 8192),
		done:    make(chan struct{}),
		routes:  make(map[string]*route),
	}
	if s.nc == nil {
		if cfg.URL == "" {
			return nil, errors.New("natsstore: no URL and no Conn")
		}
		opts := append([]nats.Option{
			nats.Name("peerlink rendezvous"),
			nats.MaxReconnects(-1),
			nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { log.Warn("nats disconnected", "err", err) }),
			nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("nats reconnected", "server", nc.ConnectedUrlRedacted()) }),
		}, cfg.Options...)
		nc, err := nats.Connect(cfg.URL, opts...)
		if err != nil {
			return nil, fmt.Errorf("natsstore: connect: %w", err)
		}
		s.nc, s.ownConn = nc, true
	}
	if err := s.setupBuckets(ctx); err != nil {
		if s.ownConn {
			s.nc.Close()
		}
		return nil, err
	}
	s.wg.Go(s.dispatch)
	return s, nil
}

func (s *Store) setupBuckets(ctx context.Context) error {
	js, err := jetstream.New(s.nc)
	if err != nil {
		return fmt.Errorf("natsstore: %w", err)
	}
	for _, b := range store.Buckets {
		cfg := jetstream.KeyValueConfig{
			Bucket:      s.cfg.Prefix + "_" + string(b),
			Description: "peerlink rendezvous " + string(b),
			TTL:         s.cfg.TTLs.Of(b),
			Replicas:    s.cfg.Replicas,
			History:     1,
		}
		for {
			rctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
			kv, err := js.CreateOrUpdateKeyValue(rctx, cfg)
			cancel()
			if err == nil {
				s.kv[b] = kv
				break
			}
			s.log.Debug("natsstore: bucket setup failed, retrying", "bucket", cfg.Bucket, "err", err)
			select {
			case <-ctx.Done():
				return fmt.Errorf("natsstore: bucket %s: %w (last error: %v)", cfg.Bucket, ctx.Err(), err)
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	return nil
}

func (s *Store) bucket(b store.Bucket) (jetstream.KeyValue, error) {
	kv, ok := s.kv[b]
	if !ok {
		return nil, fmt.Errorf("%w %q", store.ErrUnknownBucket, b)
	}
	if s.nc.IsClosed() {
		return nil, store.ErrClosed
	}
	return kv, nil
}

// Put stores value under key.
func (s *Store) Put(ctx context.Context, b store.Bucket, key string, value []byte) error {
	kv, err := s.bucket(b)
	if err != nil {
		return err
	}
	if _, err := kv.Put(ctx, key, value); err != nil {
		return fmt.Errorf("natsstore: put %s/%s: %w", b, key, err)
	}
	return nil
}

// Get returns the value under key or store.ErrNotFound.
func (s *Store) Get(ctx context.Context, b store.Bucket, key string) ([]byte, error) {
	v, _, err := s.GetRev(ctx, b, key)
	return v, err
}

// GetRev returns the value under key and its revision (the stream sequence of the
// value), or store.ErrNotFound.
func (s *Store) GetRev(ctx context.Context, b store.Bucket, key string) ([]byte, uint64, error) {
	kv, err := s.bucket(b)
	if err != nil {
		return nil, 0, err
	}
	e, err := kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return nil, 0, store.ErrNotFound
	}
	if err != nil {
		return nil, 0, fmt.Errorf("natsstore: get %s/%s: %w", b, key, err)
	}
	return e.Value(), e.Revision(), nil
}

// Update stores value under key if key is at rev (JetStream's expected last sequence
// per subject); rev 0 creates the key, also over a delete marker. A mismatch is
// store.ErrConflict.
func (s *Store) Update(ctx context.Context, b store.Bucket, key string, value []byte, rev uint64) error {
	kv, err := s.bucket(b)
	if err != nil {
		return err
	}
	if rev == 0 {
		_, err = kv.Create(ctx, key, value)
	} else {
		_, err = kv.Update(ctx, key, value, rev)
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, jetstream.ErrKeyExists), errors.Is(err, jetstream.ErrKeyRevisionMismatch):
		return fmt.Errorf("%w: %s/%s changed since revision %d", store.ErrConflict, b, key, rev)
	}
	return fmt.Errorf("natsstore: update %s/%s: %w", b, key, err)
}

// Delete removes key.
func (s *Store) Delete(ctx context.Context, b store.Bucket, key string) error {
	kv, err := s.bucket(b)
	if err != nil {
		return err
	}
	if err := kv.Delete(ctx, key); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("natsstore: delete %s/%s: %w", b, key, err)
	}
	return nil
}

// List returns the live entries of b.
func (s *Store) List(ctx context.Context, b store.Bucket) ([]store.Entry, error) {
	kv, err := s.bucket(b)
	if err != nil {
		return nil, err
	}
	keys, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("natsstore: list %s: %w", b, err)
	}
	defer keys.Stop()
	var names []string
	for k := range keys.Keys() {
		names = append(names, k)
	}
	var out []store.Entry
	for _, k := range names {
		e, err := kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
			continue // expired or deleted between listing and reading
		}
		if err != nil {
			return nil, fmt.Errorf("natsstore: list %s: %w", b, err)
		}
		out = append(out, store.Entry{Key: k, Value: e.Value()})
	}
	return out, nil
}

// Attach subscribes to node's subject. Every attached node's messages arrive on one
// channel and are handled by one goroutine, so ten thousand attached nodes cost ten
// thousand subscriptions but not ten thousand goroutines.
func (s *Store) Attach(node string, h store.Handler) (func(), error) {
	if !validToken(node) {
		return nil, fmt.Errorf("natsstore: %q cannot be a subject token", node)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, store.ErrClosed
	}
	r := &route{h: h}
	if old, ok := s.routes[node]; ok {
		r.sub = old.sub // same subject: keep the subscription, swap the handler
	} else {
		sub, err := s.nc.ChanSubscribe(s.subject+node, s.msgs)
		if err != nil {
			return nil, fmt.Errorf("natsstore: subscribe: %w", err)
		}
		r.sub = sub
	}
	s.routes[node] = r
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if cur, ok := s.routes[node]; ok && cur == r {
			delete(s.routes, node)
			// Drain, not Unsubscribe: frames already on their way are still taken and
			// answered "no_route", instead of vanishing and leaving senders to time out.
			if err := r.sub.Drain(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
				s.log.Debug("natsstore: unsubscribe", "node", node, "err", err)
			}
		}
	}, nil
}

// validToken reports whether t can be one token of a NATS subject.
func validToken(t string) bool {
	return t != "" && !strings.ContainsAny(t, ".*> \t\r\n")
}

func (s *Store) dispatch() {
	for {
		select {
		case <-s.done:
			return
		case m := <-s.msgs:
			s.handle(m)
		}
	}
}

func (s *Store) handle(m *nats.Msg) {
	node := strings.TrimPrefix(m.Subject, s.subject)
	s.mu.Lock()
	r, ok := s.routes[node]
	s.mu.Unlock()
	reply := nats.NewMsg(m.Reply)
	switch {
	case !ok:
		// Detached while the message was queued. If another server has the node too,
		// the sender may take this answer over its "ok"; the window is the moment
		// between a node leaving one server and the unsubscribe reaching NATS.
		reply.Header.Set(hdrStatus, "no_route")
	case m.Header.Get(hdrOp) == "ping":
		reply.Header.Set(hdrStatus, "ok")
	default:
		switch err := store.Reject(r.h(m.Data)); {
		case err == nil:
			reply.Header.Set(hdrStatus, "ok")
		case errors.Is(err, store.ErrNoRoute):
			reply.Header.Set(hdrStatus, "no_route")
		default:
			reply.Header.Set(hdrStatus, "rejected")
			reply.Header.Set(hdrReason, err.(*store.RejectedError).Reason)
		}
	}
	if m.Reply == "" {
		return
	}
	if err := m.RespondMsg(reply); err != nil {
		s.log.Debug("natsstore: reply", "err", err)
	}
}

func (s *Store) request(ctx context.Context, node, op string, frame []byte) error {
	if !validToken(node) {
		return store.ErrNoRoute
	}
	if s.nc.IsClosed() {
		return store.ErrClosed
	}
	// Always bounded, whatever the caller's deadline: a request that reached a server
	// just as it died gets neither an answer nor "no responders".
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	m := nats.NewMsg(s.subject + node)
	m.Header.Set(hdrOp, op)
	m.Data = frame
	resp, err := s.nc.RequestMsgWithContext(ctx, m)
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return store.ErrNoRoute
	case errors.Is(err, nats.ErrConnectionClosed):
		return store.ErrClosed
	case err != nil:
		return fmt.Errorf("natsstore: route to %s: %w", node, err)
	}
	switch resp.Header.Get(hdrStatus) {
	case "ok":
		return nil
	case "no_route":
		return store.ErrNoRoute
	case "rejected":
		return &store.RejectedError{Reason: resp.Header.Get(hdrReason)}
	}
	return fmt.Errorf("natsstore: route to %s: malformed reply", node)
}

// Route delivers frame to node's handler on whichever server has it attached.
func (s *Store) Route(ctx context.Context, node string, frame []byte) error {
	return s.request(ctx, node, "deliver", frame)
}

// Online asks whether any server has node attached.
func (s *Store) Online(ctx context.Context, node string) (bool, error) {
	switch err := s.request(ctx, node, "ping", nil); {
	case err == nil:
		return true, nil
	case errors.Is(err, store.ErrNoRoute):
		return false, nil
	default:
		return false, err
	}
}

// Close unsubscribes, stops the dispatcher and closes the connection if the store opened
// it. It is idempotent.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for node, r := range s.routes {
		_ = r.sub.Unsubscribe()
		delete(s.routes, node)
	}
	s.mu.Unlock()
	close(s.done)
	s.wg.Wait()
	if s.ownConn {
		s.nc.Close()
	}
	return nil
}
