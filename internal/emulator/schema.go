package emulator

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// schema is one of Firecracker's request structs as serde derives its
// decoder: the fields in declaration order, which of them are required (no
// default, not an Option), whether unknown fields are refused
// (deny_unknown_fields, on every request struct but a few nested ones) and
// which fields hold a nested struct or an array of them.
type schema struct {
	fields   []string
	required []string
	open     bool               // no deny_unknown_fields: unknown keys are ignored
	nested   map[string]*schema // a struct, or an array of structs, in this field
}

func strict(fields ...string) *schema { return &schema{fields: fields} }

func (s *schema) require(f ...string) *schema { s.required = f; return s }

func (s *schema) nest(field string, n *schema) *schema {
	if s.nested == nil {
		s.nested = map[string]*schema{}
	}
	s.nested[field] = n
	return s
}

// requestSchemas are the request structs of release r, keyed by route
// ("PUT snapshot/load" etc., see routeKey). A PUT or PATCH with a body on a
// route that has no entry is refused as an unknown path, as Firecracker
// does. Only what forkd's emulator serves is listed.
func requestSchemas(r release) map[string]*schema {
	rateLimiter := strict("bandwidth", "ops") // TokenBucketConfig is not deny_unknown_fields
	machine := func() *schema {
		return strict("vcpu_count", "mem_size_mib", "smt", "cpu_template", "track_dirty_pages", "huge_pages")
	}
	netFields := []string{"iface_id", "host_dev_name", "guest_mac"}
	if r.atLeast(1, 16, 0) {
		netFields = append(netFields, "mtu")
	}
	netFields = append(netFields, "rx_rate_limiter", "tx_rate_limiter")

	load := []string{"snapshot_path", "mem_file_path", "mem_backend", "enable_diff_snapshots"}
	if r.atLeast(1, 13, 0) {
		load = append(load, "track_dirty_pages")
	}
	load = append(load, "resume_vm")
	if r.atLeast(1, 12, 0) {
		load = append(load, "network_overrides")
	}
	if r.atLeast(1, 16, 0) {
		load = append(load, "vsock_override")
	}
	// clock_realtime came with 1.16 and was backported to 1.14.4 and 1.15.1.
	if r.atLeast(1, 16, 0) || (r.minor == 15 && r.patch >= 1) || (r.minor == 14 && r.patch >= 4) {
		load = append(load, "clock_realtime")
	}
	loadSchema := strict(load...).require("snapshot_path").
		nest("mem_backend", strict("backend_path", "backend_type").require("backend_path", "backend_type")).
		// NetworkOverride and VsockOverride are not deny_unknown_fields.
		nest("network_overrides", &schema{fields: []string{"iface_id", "host_dev_name"}, required: []string{"iface_id", "host_dev_name"}, open: true}).
		nest("vsock_override", &schema{fields: []string{"uds_path"}, required: []string{"uds_path"}, open: true})

	schemas := map[string]*schema{
		"PUT machine-config":   machine().require("vcpu_count", "mem_size_mib"),
		"PATCH machine-config": machine(),
		"PUT boot-source":      strict("kernel_image_path", "initrd_path", "boot_args").require("kernel_image_path"),
		"PUT drives": strict("drive_id", "partuuid", "is_root_device", "cache_type", "is_read_only", "path_on_host",
			"rate_limiter", "io_engine", "socket").require("drive_id", "is_root_device").nest("rate_limiter", rateLimiter),
		"PATCH drives": strict("drive_id", "path_on_host", "rate_limiter").require("drive_id").nest("rate_limiter", rateLimiter),
		"PUT network-interfaces": strict(netFields...).require("iface_id", "host_dev_name").
			nest("rx_rate_limiter", rateLimiter).nest("tx_rate_limiter", rateLimiter),
		"PATCH network-interfaces": strict("iface_id", "rx_rate_limiter", "tx_rate_limiter").require("iface_id").
			nest("rx_rate_limiter", rateLimiter).nest("tx_rate_limiter", rateLimiter),
		"PUT vsock":           strict("vsock_id", "guest_cid", "uds_path").require("guest_cid", "uds_path"),
		"PUT actions":         strict("action_type").require("action_type"),
		"PATCH vm":            strict("state").require("state"),
		"PUT snapshot/create": strict("snapshot_type", "snapshot_path", "mem_file_path").require("snapshot_path", "mem_file_path"),
		"PUT snapshot/load":   loadSchema,
		"PUT logger":          strict("log_path", "level", "show_level", "show_log_origin", "module"),
		"PUT metrics":         &schema{fields: []string{"metrics_path"}, required: []string{"metrics_path"}, open: true},
	}
	for k, v := range testHookSchemas() {
		schemas[k] = v
	}
	return schemas
}

// routeKey is the schema key of a request: its method and the path's first
// segment, with the operation for /snapshot/{create,load}, as Firecracker's
// router splits it.
func routeKey(method, path string) string {
	parts := strings.Split(strings.Trim(path, "/"), "/")
	key := method + " " + parts[0]
	if parts[0] == "snapshot" && len(parts) > 1 {
		key += "/" + parts[1]
	}
	return key
}

// deserializeError is serde_json's refusal of a body: Firecracker answers
// 400 with it as "An error occurred when deserializing the json body of a
// request: <msg>."
type deserializeError struct{ msg string }

func (e deserializeError) Error() string {
	return "An error occurred when deserializing the json body of a request: " + e.msg + "."
}

// check walks a JSON body the way serde decodes s: the first unknown field
// of a deny_unknown_fields struct (in document order) or a duplicate field
// is refused where it is read, then the first required field missing (in
// declaration order) at the end of its object, each with serde's message
// and position. A body that is not an object, or malformed JSON, passes:
// the typed decode reports those.
func (s *schema) check(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		return nil
	}
	return s.object(dec, data)
}

// object checks the members of an object whose '{' was just read.
func (s *schema) object(dec *json.Decoder, data []byte) error {
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil
		}
		key, _ := tok.(string)
		at := dec.InputOffset()
		known := slices.Contains(s.fields, key)
		switch {
		case !known && !s.open:
			return serdeError(data, at, unknownField(key, s.fields))
		case known && seen[key]:
			return serdeError(data, at, fmt.Sprintf("duplicate field `%s`", key))
		}
		seen[key] = true
		if n := s.nested[key]; known && n != nil {
			if err := n.value(dec, data); err != nil {
				return err
			}
		} else if !skipValue(dec) {
			return nil
		}
	}
	if _, err := dec.Token(); err != nil { // '}'
		return nil
	}
	for _, f := range s.required {
		if !seen[f] {
			return serdeError(data, dec.InputOffset(), fmt.Sprintf("missing field `%s`", f))
		}
	}
	return nil
}

// value checks a nested value: an object, an array of objects, or a scalar
// (null, or a type error the typed decode reports).
func (s *schema) value(dec *json.Decoder, data []byte) error {
	tok, err := dec.Token()
	if err != nil {
		return nil
	}
	switch tok {
	case json.Delim('{'):
		return s.object(dec, data)
	case json.Delim('['):
		for dec.More() {
			if err := s.value(dec, data); err != nil {
				return err
			}
		}
		dec.Token() // ']'
	}
	return nil
}

// skipValue consumes one value; false on malformed JSON.
func skipValue(dec *json.Decoder) bool {
	depth := 0
	for {
		tok, err := dec.Token()
		if err != nil {
			return false
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			depth++
		case json.Delim('}'), json.Delim(']'):
			depth--
		}
		if depth == 0 {
			return true
		}
	}
}

// unknownField is serde's message for a field a deny_unknown_fields struct
// does not declare.
func unknownField(name string, expected []string) string {
	quoted := make([]string, len(expected))
	for i, f := range expected {
		quoted[i] = "`" + f + "`"
	}
	switch len(quoted) {
	case 0:
		return fmt.Sprintf("unknown field `%s`, there are no fields", name)
	case 1:
		return fmt.Sprintf("unknown field `%s`, expected %s", name, quoted[0])
	case 2:
		return fmt.Sprintf("unknown field `%s`, expected %s or %s", name, quoted[0], quoted[1])
	}
	return fmt.Sprintf("unknown field `%s`, expected one of %s", name, strings.Join(quoted, ", "))
}

// serdeError places msg at byte offset at of data as serde_json does: "at
// line L column C", C counting the bytes of the line read so far.
func serdeError(data []byte, at int64, msg string) error {
	before := data[:min(int(at), len(data))]
	line := 1 + bytes.Count(before, []byte("\n"))
	col := len(before) - (bytes.LastIndexByte(before, '\n') + 1)
	return deserializeError{fmt.Sprintf("%s at line %d column %d", msg, line, col)}
}
