package network

// NewAsIfInitial is New with the calling thread's namespace taken for the
// host's initial one, so a test can check the refusal inside a namespace of
// its own instead of on the host's network.
func NewAsIfInitial(cfg Config) (*Host, error) {
	return newHost(cfg, func(nsID) bool { return true })
}
