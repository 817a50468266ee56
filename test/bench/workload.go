package bench

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// StampScript is the benchmark workload's first shell commands: busybox's adjtimex reads the
// kernel clock (CLOCK_REALTIME, which the host and every container share) with microsecond
// resolution, as the workload's first action; then the workload counts the mounts it sees.
// ParseStamp reads both back from the container's log.
const StampScript = "adjtimex\necho \"mounts $(wc -l < /proc/self/mountinfo)\""

// Stamp is what the workload printed: when its first command ran, and how many mounts its
// container has.
type Stamp struct {
	Time   time.Time
	Mounts int
}

// ParseStamp reads the time.tv_sec and time.tv_usec lines of adjtimex and the mounts line of
// StampScript from a container log.
func ParseStamp(log string) (Stamp, error) {
	var sec, usec int64 = -1, -1
	st := Stamp{Mounts: -1}
	for _, line := range strings.Split(log, "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		n, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			continue
		}
		switch f[0] {
		case "time.tv_sec:":
			sec = n
		case "time.tv_usec:":
			usec = n
		case "mounts":
			st.Mounts = int(n)
		}
	}
	if sec < 0 || usec < 0 || usec >= 1e6 {
		return Stamp{}, fmt.Errorf("no adjtimex time in the workload's log: %q", firstLines(log, 3))
	}
	st.Time = time.Unix(sec, usec*1000)
	return st, nil
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n")
}

// Arms of the pod-start comparison, in report order.
const (
	ArmFloor   = "uninstrumented"
	ArmInit    = "init-container"
	ArmIVWarm  = "image-volume-warm"
	ArmIVCold  = "image-volume-cold"
	ArmCSIWarm = "csi-warm"
	ArmCSICold = "csi-cold"
	armsImages = "images"
)

// Arms lists the arms in report order.
var Arms = []string{ArmFloor, ArmInit, ArmIVWarm, ArmIVCold, ArmCSIWarm, ArmCSICold}

// RoundOrder is the order in which round i starts one pod per arm. The arms rotate every
// round, except that the three arms that use the library images in containerd (init
// containers, image volumes warm and cold) run as one block whose first pod is always the cold
// image-volume one: the images are removed from containerd before each round, the cold pod
// pulls them, and the two warm arms after it find them on the node. Inside the block the two
// warm arms alternate.
func RoundOrder(i int) []string {
	slots := []string{ArmFloor, ArmCSIWarm, ArmCSICold, armsImages}
	block := []string{ArmIVCold, ArmInit, ArmIVWarm}
	if i%2 == 1 {
		block = []string{ArmIVCold, ArmIVWarm, ArmInit}
	}
	var out []string
	for k := range slots {
		s := slots[(i+k)%len(slots)]
		if s == armsImages {
			out = append(out, block...)
			continue
		}
		out = append(out, s)
	}
	return out
}
