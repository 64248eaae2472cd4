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
// every GET 200 with JSON, as in Firecracker.
func (v *vmm) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, v.describe()) })
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
		writeFault(w, faultf("Invalid request method and/or path: %s %s.", r.Method, r.URL.Path))
	})
	return mux
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

// action decodes the body strictly into T (unknown fields refused, as
// Firecracker's serde(deny_unknown_fields)) and runs do.
func action[T any](do func(T) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var body T
		if err := decodeStrict(r.Body, &body); err != nil {
			writeFault(w, fault(fmt.Sprintf("An error occurred when deserializing the json body of a request: %v.", err)))
			return
		}
		if err := do(body); err != nil {
			writeFault(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}
}

func decodeStrict(r io.Reader, dst any) error {
	data, err := io.ReadAll(io.LimitReader(r, maxBody+1))
	if err != nil {
		return err
	}
	if len(data) > maxBody {
		return fmt.Errorf("request payload exceeds %d bytes", maxBody)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return fmt.Errorf("empty body")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
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
