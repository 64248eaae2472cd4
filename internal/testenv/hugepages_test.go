package testenv

import "testing"

func TestHugePagesGrowsThePoolForTheTestOnly(t *testing.T) {
	NeedRoot(t)
	before, err := readHugePages()
	if err != nil {
		Need(t, Huge, err.Error())
	}
	t.Run("holder", func(t *testing.T) {
		HugePages(t, 3)
		if got, err := readHugePages(); err != nil || got != before+3 {
			t.Fatalf("pool during the test = %d, %v; want %d", got, err, before+3)
		}
	})
	if got, err := readHugePages(); err != nil || got != before {
		t.Fatalf("pool after the test = %d, %v; want %d back", got, err, before)
	}
}
