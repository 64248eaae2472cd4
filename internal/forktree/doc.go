// Package forktree keeps a pool of empty fork trees made ahead of the forks
// that will take them.
//
// Why: a fork's directory is a small tree of empty directories (its jail,
// the jail's root, snapshots/ and snapshot-latest/) into which its files are
// linked. Making those directories is most of a fork's filesystem work, and
// in a batch of forks it is most of what the batch's log forces carry. A
// tree made ahead, for a fork id drawn ahead, turns that work into nothing
// at fork time: the fork links its files into the tree and renames it into
// place, as it would one it had just made.
//
// The pool knows nothing of the data dir's layout: its Maker makes and
// removes the tree of an id, and settles the trees made (makes them
// durable). The pool refills only while no operation that may take a tree
// is in flight (Busy), and settles each round of refills that ends with
// none in flight, so its own directory work never lands in a fork's log
// force: a directory made and never synced waits in the filesystem's log
// for the next fsync of anything, which would be a fork's. A round cut
// short by an operation is left to that operation's own log force. The
// pool removes every tree it still holds when closed.
//
// Invariants:
//   - A tree is handed out once: Take removes the ids it returns from the
//     pool, under the pool's lock.
//   - A tree in the pool is empty and no VM's. Nothing in it needs to
//     survive a crash or a power cut: the reconciler removes the trees a
//     daemon that stopped without Close left behind.
package forktree
