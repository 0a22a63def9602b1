// Package faultlab measures how peerlink's connections live through server and network faults in the kernel NAT lab.
package faultlab
