// Launchers for cert-manager's controller, webhook and cainjector, built from the
// github.com/cert-manager/cert-manager module by hack/cert-manager-binaries.sh (which writes the
// real go.mod of the build in a temporary directory). This file only keeps these programs out of
// the apm-csi module.
module github.com/cert-manager/cert-manager/apm-csi-launchers

go 1.26.0
