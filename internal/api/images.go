package api

import (
	"net/http"
	"net/url"
)

// The image endpoints. An image is named in a path by a reference or
// digest, path-escaped ("ghcr.io%2Fo%2Fr:v1"), since references hold slashes.

func (h *handler) listImages(w http.ResponseWriter, r *http.Request) {
	list, err := h.svc.ListImages(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if list == nil {
		list = []Image{}
	}
	writeJSON(w, http.StatusOK, list)
}

func (h *handler) startPull(w http.ResponseWriter, r *http.Request) {
	var req PullRequest
	if _, err := decodeBody(w, r, &req, true); err != nil {
		h.fail(w, r, err)
		return
	}
	if err := req.Validate(); err != nil {
		h.fail(w, r, err)
		return
	}
	p, err := h.svc.StartPull(r.Context(), req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	w.Header().Set("Location", "/images/pulls/"+url.PathEscape(p.ID))
	writeJSON(w, http.StatusAccepted, p)
}

func (h *handler) getPull(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := ValidateRef(id); err != nil {
		h.fail(w, r, err)
		return
	}
	p, err := h.svc.GetPull(r.Context(), id)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, p)
}

func (h *handler) gcImages(w http.ResponseWriter, r *http.Request) {
	res, err := h.svc.GCImages(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if res.Deleted == nil {
		res.Deleted = []Image{}
	}
	writeJSON(w, http.StatusOK, res)
}

func (h *handler) getImage(w http.ResponseWriter, r *http.Request) {
	ref := r.PathValue("ref")
	if err := ValidateImageRef(ref); err != nil {
		h.fail(w, r, err)
		return
	}
	im, err := h.svc.GetImage(r.Context(), ref)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, im)
}

func (h *handler) deleteImage(w http.ResponseWriter, r *http.Request) {
	ref := r.PathValue("ref")
	if err := ValidateImageRef(ref); err != nil {
		h.fail(w, r, err)
		return
	}
	if err := h.svc.DeleteImage(r.Context(), ref); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
