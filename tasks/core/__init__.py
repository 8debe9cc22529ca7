"""Library code every stage uses: errors, params, storage, image I/O, tracking, paths, devices."""
