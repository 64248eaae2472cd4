package api

import (
	"crypto/sha256"
	"crypto/subtle"
	"net/http"
	"strings"
)

// RequireBearer lets through only requests carrying
// "Authorization: Bearer <token>". It guards the TCP listener; the Unix
// socket relies on its file mode (0600) instead.
func RequireBearer(token string, next http.Handler) http.Handler {
	// Compare fixed-size digests in constant time, so neither the content
	// nor the length of the token leaks through response timing.
	want := sha256.Sum256([]byte(token))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := bearerToken(r.Header.Get("Authorization"))
		gotSum := sha256.Sum256([]byte(got))
		if !ok || token == "" || subtle.ConstantTimeCompare(gotSum[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="forkd"`)
			writeError(w, errorf(http.StatusUnauthorized, CodeUnauthorized,
				"missing or wrong bearer token: send Authorization: Bearer <the daemon's token_file contents>"))
			return
		}
		next.ServeHTTP(w, r)
	})
}

func bearerToken(h string) (string, bool) {
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	return tok, tok != ""
}
