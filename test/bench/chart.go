package bench

import (
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"math"
	"os"
	"strings"
)

// The chart is drawn with the standard library only (the module has no plotting or font
// package): filled rectangles and a 5x7 bitmap font of the characters the labels use.

// Bar is one bar of a chart panel: a value with an optional whisker (e.g. p90) and a label.
type Bar struct {
	Label   string
	Value   float64
	Whisker float64 // 0: none
	Text    string  // printed after the bar
	Color   color.RGBA
}

// Panel is a horizontal bar chart with a title.
type Panel struct {
	Title string
	Bars  []Bar
}

// Colours of the arms.
var (
	ColorFloor = color.RGBA{0x80, 0x80, 0x80, 0xff}
	ColorInit  = color.RGBA{0xd6, 0x4b, 0x3a, 0xff}
	ColorWarm  = color.RGBA{0x2b, 0x8a, 0x3e, 0xff}
	ColorCold  = color.RGBA{0x31, 0x6f, 0xc4, 0xff}
	// Image volumes: warm and cold.
	ColorIVWarm = color.RGBA{0xe0, 0x9a, 0x1f, 0xff}
	ColorIVCold = color.RGBA{0x8e, 0x4f, 0xb8, 0xff}
)

const (
	scale   = 2 // font pixel size
	glyphW  = 6 * scale
	lineH   = 10 * scale
	chartW  = 1100
	labelW  = 330
	barH    = 26
	barGap  = 10
	margin  = 20
	textPad = 8
)

// WriteChart draws the panels one below the other, with a title line, into a PNG file.
func WriteChart(file, title string, panels []Panel) error {
	h := margin + lineH + margin
	for _, p := range panels {
		h += lineH + 8 + len(p.Bars)*(barH+barGap) + margin
	}
	img := image.NewRGBA(image.Rect(0, 0, chartW, h))
	draw.Draw(img, img.Bounds(), image.NewUniform(color.White), image.Point{}, draw.Src)
	black := color.RGBA{0x20, 0x20, 0x20, 0xff}
	y := margin
	drawText(img, margin, y, title, black)
	y += lineH + margin
	for _, p := range panels {
		drawText(img, margin, y, p.Title, black)
		y += lineH + 8
		maxV := 0.0
		for _, b := range p.Bars {
			maxV = math.Max(maxV, math.Max(b.Value, b.Whisker))
		}
		if maxV == 0 {
			maxV = 1
		}
		// Room after the longest bar for its text.
		longest := 0
		for _, b := range p.Bars {
			longest = max(longest, len(b.Text))
		}
		plotW := chartW - labelW - margin - textPad - longest*glyphW - margin
		x0 := labelW
		for _, b := range p.Bars {
			drawText(img, margin, y+(barH-7*scale)/2, b.Label, black)
			w := int(b.Value / maxV * float64(plotW))
			fill(img, x0, y, max(w, 1), barH, b.Color)
			end := x0 + w
			if b.Whisker > 0 {
				wx := x0 + int(b.Whisker/maxV*float64(plotW))
				fill(img, min(end, wx), y+barH/2-1, abs(wx-end)+1, 3, black)
				fill(img, wx-1, y+3, 3, barH-6, black)
				end = max(end, wx)
			}
			drawText(img, end+textPad, y+(barH-7*scale)/2, b.Text, black)
			y += barH + barGap
		}
		// Axis line.
		fill(img, x0-1, y-len(p.Bars)*(barH+barGap)-2, 2, len(p.Bars)*(barH+barGap), black)
		y += margin
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}

func fill(img *image.RGBA, x, y, w, h int, c color.Color) {
	draw.Draw(img, image.Rect(x, y, x+w, y+h), image.NewUniform(c), image.Point{}, draw.Src)
}

func drawText(img *image.RGBA, x, y int, s string, c color.Color) {
	for _, r := range strings.ToUpper(s) {
		g, ok := font5x7[r]
		if !ok {
			g = font5x7['?']
		}
		for row, line := range g {
			for col, px := range line {
				if px == '#' {
					fill(img, x+col*scale, y+row*scale, scale, scale, c)
				}
			}
		}
		x += glyphW
	}
}

// font5x7 is a 5x7 bitmap font: upper case, digits and the punctuation the labels use.
var font5x7 = map[rune][7]string{
	' ': {".....", ".....", ".....", ".....", ".....", ".....", "....."},
	'A': {".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"},
	'B': {"####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."},
	'C': {".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."},
	'D': {"####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."},
	'E': {"#####", "#....", "#....", "####.", "#....", "#....", "#####"},
	'F': {"#####", "#....", "#....", "####.", "#....", "#....", "#...."},
	'G': {".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"},
	'H': {"#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"},
	'I': {".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."},
	'J': {"..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."},
	'K': {"#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"},
	'L': {"#....", "#....", "#....", "#....", "#....", "#....", "#####"},
	'M': {"#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"},
	'N': {"#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"},
	'O': {".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."},
	'P': {"####.", "#...#", "#...#", "####.", "#....", "#....", "#...."},
	'Q': {".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"},
	'R': {"####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"},
	'S': {".####", "#....", "#....", ".###.", "....#", "....#", "####."},
	'T': {"#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."},
	'U': {"#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."},
	'V': {"#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."},
	'W': {"#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."},
	'X': {"#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"},
	'Y': {"#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."},
	'Z': {"#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"},
	'0': {".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."},
	'1': {"..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."},
	'2': {".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"},
	'3': {"#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."},
	'4': {"...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."},
	'5': {"#####", "#....", "####.", "....#", "....#", "#...#", ".###."},
	'6': {"..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."},
	'7': {"#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."},
	'8': {".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."},
	'9': {".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."},
	'.': {".....", ".....", ".....", ".....", ".....", ".##..", ".##.."},
	',': {".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."},
	':': {".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."},
	'-': {".....", ".....", ".....", "#####", ".....", ".....", "....."},
	'+': {".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."},
	'/': {".....", "....#", "...#.", "..#..", ".#...", "#....", "....."},
	'(': {"...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."},
	')': {".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."},
	'%': {"##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"},
	'=': {".....", ".....", "#####", ".....", "#####", ".....", "....."},
	'<': {"...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#."},
	'>': {".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#..."},
	'?': {".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."},
	'_': {".....", ".....", ".....", ".....", ".....", ".....", "#####"},
	'|': {"..#..", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."},
	'@': {".###.", "#...#", "#.###", "#.#.#", "#.###", "#....", ".###."},
}
