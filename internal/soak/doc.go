// Package soak churns many peerlink peers through emulated NATs for a long time and
// checks that nothing leaks and no byte is corrupted; its test is all there is.
package soak
