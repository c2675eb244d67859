module gonka-operator/testing/dapi-wire

go 1.24
