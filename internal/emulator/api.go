package emulator

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"unicode"
)

// maxBody is Firecracker's default --http-api-max-payload-size (51200).
const maxBody = 51200

// handler routes Firecracker's API (and GET /guest) to the VMM. Every
// refusal is 400 with {"fault_message": "..."}, every PUT/PATCH success 204,
// every GET 200 with JSON, as in Firecracker. Every body is first checked
// against the request struct of the release the VMM stands for
// (strictBodies), so a field that release does not know is refused exactly
// as it would refuse it.
func (v *vmm) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, v.describe()) })
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]string{"firecracker_version": v.rel.String()})
	})
	mux.HandleFunc("GET /machine-config", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, v.machineConfig()) })
	mux.HandleFunc("GET /vm/config", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, v.vmConfig()) })
	mux.HandleFunc("GET /guest", func(w http.ResponseWriter, r *http.Request) {
		st, err := v.guestStats()
		if err != nil {
			writeFault(w, err)
			return
		}
		writeJSON(w, st)
	})
	mux.HandleFunc("PUT /machine-config", action(func(u machineConfigUpdate) error { return v.setMachineConfig(u, true) }))
	mux.HandleFunc("PATCH /machine-config", action(func(u machineConfigUpdate) error { return v.setMachineConfig(u, false) }))
	mux.HandleFunc("PUT /boot-source", action(func(b struct {
		KernelImagePath *string `json:"kernel_image_path"`
		BootArgs        string  `json:"boot_args"`
		InitrdPath      string  `json:"initrd_path"`
	}) error {
		if b.KernelImagePath == nil {
			return fault("missing field `kernel_image_path`")
		}
		return v.setBootSource(bootSource{KernelImagePath: *b.KernelImagePath, BootArgs: b.BootArgs, InitrdPath: b.InitrdPath})
	}))
	mux.HandleFunc("PUT /drives/{id}", func(w http.ResponseWriter, r *http.Request) {
		action(func(d struct {
			drive
			DriveID      *string `json:"drive_id"`
			IsRootDevice *bool   `json:"is_root_device"`
		}) error {
			if d.DriveID == nil {
				return fault("missing field `drive_id`")
			}
			if d.IsRootDevice == nil {
				return fault("missing field `is_root_device`")
			}
			if err := matchID(r.PathValue("id"), *d.DriveID); err != nil {
				return err
			}
			d.drive.DriveID, d.drive.IsRootDevice = *d.DriveID, *d.IsRootDevice
			return v.putDrive(d.drive)
		})(w, r)
	})
	mux.HandleFunc("PATCH /drives/{id}", func(w http.ResponseWriter, r *http.Request) {
		action(func(d struct {
			DriveID     *string         `json:"drive_id"`
			PathOnHost  string          `json:"path_on_host"`
			RateLimiter json.RawMessage `json:"rate_limiter"`
		}) error {
			if d.DriveID == nil {
				return fault("missing field `drive_id`")
			}
			if err := matchID(r.PathValue("id"), *d.DriveID); err != nil {
				return err
			}
			return v.patchDrive(*d.DriveID, d.PathOnHost)
		})(w, r)
	})
	mux.HandleFunc("PUT /network-interfaces/{id}", func(w http.ResponseWriter, r *http.Request) {
		action(func(n struct {
			netIface
			IfaceID     *string `json:"iface_id"`
			HostDevName *string `json:"host_dev_name"`
		}) error {
			if n.IfaceID == nil {
				return fault("missing field `iface_id`")
			}
			if n.HostDevName == nil {
				return fault("missing field `host_dev_name`")
			}
			if err := matchID(r.PathValue("id"), *n.IfaceID); err != nil {
				return err
			}
			n.netIface.IfaceID, n.netIface.HostDevName = *n.IfaceID, *n.HostDevName
			return v.putNetIface(n.netIface)
		})(w, r)
	})
	mux.HandleFunc("PATCH /network-interfaces/{id}", func(w http.ResponseWriter, r *http.Request) {
		action(func(u netIfaceUpdate) error {
			if u.IfaceID == nil {
				return fault("missing field `iface_id`")
			}
			if err := matchID(r.PathValue("id"), *u.IfaceID); err != nil {
				return err
			}
			return v.patchNetIface(u)
		})(w, r)
	})
	mux.HandleFunc("PUT /vsock", action(v.putVsock))
	mux.HandleFunc("PUT /actions", action(func(a struct {
		ActionType *string `json:"action_type"`
	}) error {
		if a.ActionType == nil {
			return fault("missing field `action_type`")
		}
		switch *a.ActionType {
		case "InstanceStart":
			return v.start()
		case "SendCtrlAltDel":
			return v.ctrlAltDel()
		case "FlushMetrics":
			return nil
		default:
			return faultf("unknown variant `%s`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`", *a.ActionType)
		}
	}))
	mux.HandleFunc("PATCH /vm", action(func(s struct {
		State *string `json:"state"`
	}) error {
		if s.State == nil {
			return fault("missing field `state`")
		}
		return v.setVMState(*s.State)
	}))
	mux.HandleFunc("PUT /snapshot/create", action(func(c snapshotCreate) error {
		if c.SnapshotPath == nil {
			return fault("missing field `snapshot_path`")
		}
		if c.MemFilePath == nil {
			return fault("missing field `mem_file_path`")
		}
		return v.createSnapshot(c)
	}))
	mux.HandleFunc("PUT /snapshot/load", action(v.loadSnapshot))
	// Logger and metrics may be configured on a fresh process (even before a
	// load); forkd logs through --log-path, so the bodies are only checked.
	mux.HandleFunc("PUT /logger", action(func(struct {
		LogPath       string `json:"log_path"`
		Level         string `json:"level"`
		ShowLevel     bool   `json:"show_level"`
		ShowLogOrigin bool   `json:"show_log_origin"`
		Module        string `json:"module"`
	}) error {
		return v.usableLocked()
	}))
	mux.HandleFunc("PUT /metrics", action(func(m struct {
		MetricsPath *string `json:"metrics_path"`
	}) error {
		if m.MetricsPath == nil {
			return fault("missing field `metrics_path`")
		}
		return v.usableLocked()
	}))
	registerTestHooks(mux)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeFault(w, invalidPath(r))
	})
	return strictBodies(requestSchemas(v.rel), mux)
}

func invalidPath(r *http.Request) error {
	return faultf("Invalid request method and/or path: %s %s.", r.Method, r.URL.Path)
}

// strictBodies refuses, before any handler runs, a PUT or PATCH without a
// body, on a route the release has no request struct for, or whose body
// that struct would not decode (unknown or duplicate field, missing
// required field): Firecracker parses every body with serde's
// deny_unknown_fields before acting on it. The handlers then decode the
// checked body into structs holding every field any release knows.
func strictBodies(schemas map[string]*schema, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPut && r.Method != http.MethodPatch {
			next.ServeHTTP(w, r)
			return
		}
		data, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
		if err != nil {
			writeFault(w, faultf("read request body: %v", err))
			return
		}
		if len(data) > maxBody {
			writeFault(w, deserializeError{fmt.Sprintf("request payload exceeds %d bytes", maxBody)})
			return
		}
		if len(data) == 0 {
			writeFault(w, faultf("Empty %s request.", r.Method))
			return
		}
		s := schemas[routeKey(r.Method, r.URL.Path)]
		if s == nil {
			writeFault(w, invalidPath(r))
			return
		}
		if err := s.check(data); err != nil {
			writeFault(w, err)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(data))
		next.ServeHTTP(w, r)
	})
}

func (v *vmm) usableLocked() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.usable()
}

// matchID is Firecracker's checked_id on the path's id, then its check
// that the body names the same id.
func matchID(path, body string) error {
	if path == "" {
		return fault("The ID cannot be empty.")
	}
	for _, c := range path {
		if c != '_' && !unicode.IsLetter(c) && !unicode.IsNumber(c) {
			return fault("API Resource IDs can only contain alphanumeric characters and underscores.")
		}
	}
	if path != body {
		return faultf("The id from the path [%s] does not match the id from the body [%s]!", path, body)
	}
	return nil
}

// action decodes the body (already checked by strictBodies against the
// release's struct) into T and runs do.
func action[T any](do func(T) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var body T
		if err := decodeBody(r.Body, &body); err != nil {
			writeFault(w, deserializeError{err.Error()})
			return
		}
		if err := do(body); err != nil {
			writeFault(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}
}

// decodeBody decodes one JSON value into dst. Unknown fields were refused
// by strictBodies where the release's struct denies them, so they are not
// refused here: a struct without deny_unknown_fields ignores them.
func decodeBody(r io.Reader, dst any) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return fmt.Errorf("EOF while parsing a value at line 1 column %d", len(data))
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(dst); err != nil {
		return err
	}
	if dec.More() {
		return fmt.Errorf("trailing characters after the JSON value")
	}
	return nil
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	json.NewEncoder(w).Encode(v)
}

func writeFault(w http.ResponseWriter, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusBadRequest)
	json.NewEncoder(w).Encode(map[string]string{"fault_message": err.Error()})
}
