package stun

import (
	"sync"
	"sync/atomic"
)

// Stats are a server's counters since Listen. They add up: Received is Requests +
// Dropped.NotSTUN + Dropped.Ignored, and Requests is Responses + BadRequest +
// UnknownAttribute + Dropped.RateLimited + Dropped.Forbidden (SendFailed counts responses
// a socket then refused).
type Stats struct {
	// Received counts UDP datagrams and TCP messages read.
	Received uint64
	// Requests counts well-formed Binding requests, answered or not.
	Requests uint64
	// Responses counts Binding success responses handed to a socket, ChangedResponses
	// those of them sent from another socket for a CHANGE-REQUEST.
	Responses        uint64
	ChangedResponses uint64
	// BadRequest and UnknownAttribute count error responses 400 and 420 handed to a
	// socket.
	BadRequest       uint64
	UnknownAttribute uint64
	Dropped          DropStats
}

// DropStats counts messages the server did not answer, by reason.
type DropStats struct {
	// NotSTUN: not a STUN message (header, length, FINGERPRINT, oversized).
	NotSTUN uint64
	// Ignored: STUN messages the RFC says to drop silently: responses, indications,
	// methods other than Binding.
	Ignored uint64
	// RateLimited: the source's token bucket was empty.
	RateLimited uint64
	// Forbidden: the answer would go to port 0, a non-unicast address or the server
	// itself.
	Forbidden uint64
	// SendFailed: the socket refused the response.
	SendFailed uint64
	// TCPConnLimit: TCP connections closed at once because MaxTCPConns were open.
	TCPConnLimit uint64
}

type counter int

const (
	cReceived counter = iota
	cRequests
	cResponses
	cChanged
	cBadRequest
	cUnknownAttr
	cNotSTUN
	cIgnored
	cRateLimited
	cForbidden
	cSendFailed
	cTCPLimit
	numCounters
)

// counters belong to one worker so that the hot path never shares a cache line; Stats
// adds them up.
type counters struct {
	c [numCounters]atomic.Uint64
	_ [64]byte
}

func (c *counters) add(i counter) { c.c[i].Add(1) }

// counterSet is every counters of a server.
type counterSet struct {
	mu  sync.Mutex
	all []*counters
}

func (s *counterSet) new() *counters {
	c := new(counters)
	s.mu.Lock()
	s.all = append(s.all, c)
	s.mu.Unlock()
	return c
}

func (s *counterSet) stats() Stats {
	var sum [numCounters]uint64
	s.mu.Lock()
	for _, c := range s.all {
		for i := range sum {
			sum[i] += c.c[i].Load()
		}
	}
	s.mu.Unlock()
	return Stats{
		Received:         sum[cReceived],
		Requests:         sum[cRequests],
		Responses:        sum[cResponses],
		ChangedResponses: sum[cChanged],
		BadRequest:       sum[cBadRequest],
		UnknownAttribute: sum[cUnknownAttr],
		Dropped: DropStats{
			NotSTUN:      sum[cNotSTUN],
			Ignored:      sum[cIgnored],
			RateLimited:  sum[cRateLimited],
			Forbidden:    sum[cForbidden],
			SendFailed:   sum[cSendFailed],
			TCPConnLimit: sum[cTCPLimit],
		},
	}
}
