"""Synthetic demo data in the public datasets' download layouts, one module per dataset (named as its
preparation module in data/), so that the demo runs the same preparation tool a real download goes through.

Each module provides (the registry, selfmedmae_components/registry.py, points the tools at it):

    make_demo(out_dir, ...) -> dataset folder   the demo dataset in the download layout; its options are the
                                                command line of tools/make_demo_data.py <dataset>
    write_case(folder, index, rng, shape, spacing=None) -> datalist item
                                                one case in any grid, for tools/data_benchmark.py and
                                                tools/benchmark.py (the data part)
    network_input(rng, shape) -> array (C, *shape)   (3-D datasets) one case scaled as the network sees it,
                                                for tools/benchmark.py's sliding-window part

shapes.py holds the painters (ellipsoid blobs, tubes, smooth noise) the 3-D generators share.
"""
