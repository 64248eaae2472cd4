// Package testenv is what every test of forkd uses to ask for something the
// machine may lack (root, loop devices, userfaultfd, a network namespace…)
// and to get the forkd binary.
//
// A test that cannot run here skips with the reason, unless the
// requirement is named in FORKD_TEST_REQUIRE (a comma-separated list of
// keys, or "all"): then the missing requirement is a failure. CI sets it, so
// a skip can never hide a broken product there. It must never be used for
// anything but tests: it imports "testing".
package testenv
