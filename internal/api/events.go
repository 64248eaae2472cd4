package api

import (
	"context"
	"encoding/json"
	"fmt"
	"mime"
	"net/http"
	"strings"
	"time"
)

// Event stream media types: newline-delimited JSON (the default), and
// server-sent events for clients that ask for them.
const (
	ContentTypeNDJSON = "application/x-ndjson"
	ContentTypeSSE    = "text/event-stream"
)

// sseKeepAlive is how often an idle SSE stream gets a comment line, so
// proxies and clients do not take it for dead.
const sseKeepAlive = 15 * time.Second

// wantsSSE reports whether the Accept header asks for server-sent events.
func wantsSSE(accept string) bool {
	for _, part := range strings.Split(accept, ",") {
		if mt, _, err := mime.ParseMediaType(strings.TrimSpace(part)); err == nil && mt == ContentTypeSSE {
			return true
		}
	}
	return false
}

// events streams what happens from now on: one JSON event per line, or as
// server-sent events ("event: <type>", "id: <n>", "data: <json>") with
// Accept: text/event-stream. The stream ends when the client leaves, when
// the service ends the subscription (a subscriber too far behind) and when
// the daemon stops.
func (h *handler) events(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	ch, err := h.svc.Events(ctx)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	sse := wantsSSE(r.Header.Get("Accept"))
	w.Header().Set("Cache-Control", "no-cache")
	if sse {
		w.Header().Set("Content-Type", ContentTypeSSE)
	} else {
		w.Header().Set("Content-Type", ContentTypeNDJSON)
	}
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if err := rc.Flush(); err != nil {
		return
	}
	var keepAlive <-chan time.Time
	if sse {
		t := time.NewTicker(sseKeepAlive)
		defer t.Stop()
		keepAlive = t.C
	}
	for seq := 1; ; seq++ {
		var chunk []byte
		select {
		case ev, ok := <-ch:
			if !ok {
				return
			}
			b, err := json.Marshal(ev)
			if err != nil {
				return
			}
			if sse {
				chunk = fmt.Appendf(nil, "event: %s\nid: %d\ndata: %s\n\n", ev.Type, seq, b)
			} else {
				chunk = append(b, '\n')
			}
		case <-keepAlive:
			chunk = []byte(": keep-alive\n\n")
		case <-h.stopping:
			return
		case <-ctx.Done():
			return
		}
		if _, err := w.Write(chunk); err != nil {
			return
		}
		if err := rc.Flush(); err != nil {
			return
		}
	}
}
