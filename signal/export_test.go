package signal

// SetWriterStall makes every server writer run f before each frame it sends, until the
// returned func restores the default. Set it before the server starts.
func SetWriterStall(f func()) (restore func()) {
	testHookWriterStall = f
	return func() { testHookWriterStall = nil }
}
