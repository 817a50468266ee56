package driver

import "github.com/apm-csi/apm-csi/nodeplugin/library"

// LibraryStore is the library store the driver composes volumes from (library.Store), under
// the name Config.Libraries has always had.
type LibraryStore = library.Store
