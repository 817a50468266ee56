package tracer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// A minimal MessagePack decoder (https://github.com/msgpack/msgpack/blob/master/spec.md):
// enough to read what tracers send to the agent's trace endpoints. Values decode to nil,
// bool, int64, uint64, float64, string, []byte, []any and map[any]any; extension values
// are skipped (decoded as nil).

// maxMsgpackDepth bounds nesting, so a hostile or corrupt payload cannot exhaust the stack.
const maxMsgpackDepth = 64

var errTruncated = errors.New("msgpack: truncated input")

// decodeMsgpack decodes exactly one value that spans all of data.
func decodeMsgpack(data []byte) (any, error) {
	d := &msgpackDecoder{buf: data}
	v, err := d.value(0)
	if err != nil {
		return nil, err
	}
	if d.pos != len(d.buf) {
		return nil, fmt.Errorf("msgpack: %d trailing bytes after the value", len(d.buf)-d.pos)
	}
	return v, nil
}

type msgpackDecoder struct {
	buf []byte
	pos int
}

func (d *msgpackDecoder) take(n int) ([]byte, error) {
	if n < 0 || len(d.buf)-d.pos < n {
		return nil, errTruncated
	}
	b := d.buf[d.pos : d.pos+n]
	d.pos += n
	return b, nil
}

func (d *msgpackDecoder) uint(n int) (uint64, error) {
	b, err := d.take(n)
	if err != nil {
		return 0, err
	}
	switch n {
	case 1:
		return uint64(b[0]), nil
	case 2:
		return uint64(binary.BigEndian.Uint16(b)), nil
	case 4:
		return uint64(binary.BigEndian.Uint32(b)), nil
	default:
		return binary.BigEndian.Uint64(b), nil
	}
}

// length reads an n-byte length and checks that at least min bytes per element remain, so a
// forged length cannot make the decoder allocate more than the input could hold.
func (d *msgpackDecoder) length(n, minPerElem int) (int, error) {
	v, err := d.uint(n)
	if err != nil {
		return 0, err
	}
	if v > uint64(len(d.buf)-d.pos)/uint64(minPerElem) {
		return 0, errTruncated
	}
	return int(v), nil
}

func (d *msgpackDecoder) value(depth int) (any, error) {
	if depth > maxMsgpackDepth {
		return nil, errors.New("msgpack: nested too deeply")
	}
	tb, err := d.take(1)
	if err != nil {
		return nil, err
	}
	t := tb[0]
	switch {
	case t <= 0x7f: // positive fixint
		return int64(t), nil
	case t >= 0xe0: // negative fixint
		return int64(int8(t)), nil
	case t >= 0x80 && t <= 0x8f:
		return d.mapOf(int(t&0x0f), depth)
	case t >= 0x90 && t <= 0x9f:
		return d.arrayOf(int(t&0x0f), depth)
	case t >= 0xa0 && t <= 0xbf:
		return d.str(int(t & 0x1f))
	}
	switch t {
	case 0xc0:
		return nil, nil
	case 0xc2:
		return false, nil
	case 0xc3:
		return true, nil
	case 0xc4, 0xc5, 0xc6: // bin 8/16/32
		n, err := d.length(1<<(t-0xc4), 1)
		if err != nil {
			return nil, err
		}
		b, err := d.take(n)
		if err != nil {
			return nil, err
		}
		return append([]byte(nil), b...), nil
	case 0xc7, 0xc8, 0xc9: // ext 8/16/32: type byte + data, skipped
		n, err := d.length(1<<(t-0xc7), 1)
		if err != nil {
			return nil, err
		}
		_, err = d.take(n + 1)
		return nil, err
	case 0xca:
		v, err := d.uint(4)
		return float64(math.Float32frombits(uint32(v))), err
	case 0xcb:
		v, err := d.uint(8)
		return math.Float64frombits(v), err
	case 0xcc, 0xcd, 0xce, 0xcf:
		v, err := d.uint(1 << (t - 0xcc))
		return v, err
	case 0xd0:
		v, err := d.uint(1)
		return int64(int8(v)), err
	case 0xd1:
		v, err := d.uint(2)
		return int64(int16(v)), err
	case 0xd2:
		v, err := d.uint(4)
		return int64(int32(v)), err
	case 0xd3:
		v, err := d.uint(8)
		return int64(v), err
	case 0xd4, 0xd5, 0xd6, 0xd7, 0xd8: // fixext 1/2/4/8/16, skipped
		_, err := d.take(1 + 1<<(t-0xd4))
		return nil, err
	case 0xd9, 0xda, 0xdb: // str 8/16/32
		n, err := d.length(1<<(t-0xd9), 1)
		if err != nil {
			return nil, err
		}
		return d.str(n)
	case 0xdc, 0xdd: // array 16/32
		n, err := d.length(2<<(t-0xdc), 1)
		if err != nil {
			return nil, err
		}
		return d.arrayOf(n, depth)
	case 0xde, 0xdf: // map 16/32
		n, err := d.length(2<<(t-0xde), 2)
		if err != nil {
			return nil, err
		}
		return d.mapOf(n, depth)
	}
	return nil, fmt.Errorf("msgpack: invalid type byte 0x%02x at offset %d", t, d.pos-1)
}

func (d *msgpackDecoder) str(n int) (string, error) {
	b, err := d.take(n)
	return string(b), err
}

func (d *msgpackDecoder) arrayOf(n, depth int) ([]any, error) {
	out := make([]any, 0, n)
	for range n {
		v, err := d.value(depth + 1)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

func (d *msgpackDecoder) mapOf(n, depth int) (map[any]any, error) {
	out := make(map[any]any, n)
	for range n {
		k, err := d.value(depth + 1)
		if err != nil {
			return nil, err
		}
		v, err := d.value(depth + 1)
		if err != nil {
			return nil, err
		}
		switch k.(type) {
		case []any, map[any]any, []byte:
			return nil, fmt.Errorf("msgpack: unsupported map key type %T", k)
		}
		out[k] = v
	}
	return out, nil
}

// asUint64 converts a decoded integer (tracers use either signedness for ids and times).
func asUint64(v any) (uint64, bool) {
	switch n := v.(type) {
	case uint64:
		return n, true
	case int64:
		return uint64(n), true
	case float64:
		return uint64(n), true
	}
	return 0, false
}

func asInt64(v any) (int64, bool) {
	u, ok := asUint64(v)
	return int64(u), ok
}

func asFloat64(v any) (float64, bool) {
	switch n := v.(type) {
	case float64:
		return n, true
	case int64:
		return float64(n), true
	case uint64:
		return float64(n), true
	}
	return 0, false
}
