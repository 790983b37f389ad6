"""Annotation readers: every format gives the same thing, {image: (N, 2) x, y in level-0 pixel indices}, and, with
`read_labelled_points`, each point's class label where the format names one."""
from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsiproc.io.annotations import (image_key, label_centroids, read_imagescope_regions, read_label_map,
                                          read_labelled_points, read_points)

MONUSEG_IMAGE = "TCGA-18-5592-01Z-00-DX1"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------- CSV


def test_monuseg_centroid_csv_is_keyed_by_image_name(shared_data: Path) -> None:
    points = read_points(shared_data / "monuseg-train/centroids" / f"train_{MONUSEG_IMAGE}_from_masks.csv")

    assert list(points) == [MONUSEG_IMAGE]
    xy = points[MONUSEG_IMAGE]
    assert xy.shape == (480, 2) and xy.dtype == np.float64
    np.testing.assert_allclose(xy[0], [100.78, 86.8])  # label,x,y,area_px: extra columns ignored


def test_multi_image_csv_gives_one_entry_per_image(shared_data: Path) -> None:
    points = read_points(shared_data / "crc-dev/points.csv")

    assert sorted(points) == sorted(f"img{k}" for k in range(1, 51))
    assert sum(len(xy) for xy in points.values()) == 14_057
    np.testing.assert_allclose(points["img1"][:2], [[148.78, 181.48], [96.6, 159.68]])

    only = read_points(shared_data / "crc-dev/points.csv", image="img7")
    assert list(only) == ["img7"]
    np.testing.assert_array_equal(only["img7"], points["img7"])


def test_multi_image_csv_rejects_an_image_it_does_not_hold(tmp_path: Path) -> None:
    path = tmp_path / "points.csv"
    path.write_text("image,x,y\na,1,2\nb,3,4\n")

    with pytest.raises(ValueError, match=r"points\.csv: no points for image 'c' \(the file has 2 images: a, b\)"):
        read_points(path, image="c")


def test_single_image_csv_can_be_renamed_and_may_be_empty(tmp_path: Path) -> None:
    path = tmp_path / "slide_points.csv"
    path.write_text("X, Y ,label\n1.5,2.5,tumour\n\n3,4,stroma\n")  # header case and spaces as spreadsheets write them

    assert list(read_points(path)) == ["slide"]
    renamed = read_points(path, image="other")
    np.testing.assert_array_equal(renamed["other"], [[1.5, 2.5], [3.0, 4.0]])

    empty = tmp_path / "none.csv"
    empty.write_text("x,y,x_um,y_um,confidence,area_um2\n")  # wsiproc's output for an image without nuclei
    assert read_points(empty)["none"].shape == (0, 2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("col,row\n1,2\n", r"no x and y columns in header \['col', 'row'\]"),
        ("x,y\n1,2\n3,oops\n", r"line 3: x, y not numbers: \['3', 'oops'\]"),
        ("x,y\n1,nan\n", "line 2: non-finite coordinate"),
        ("image,x,y\n,1,2\n", "line 2: empty image name"),
    ],
)
def test_broken_csv_names_file_and_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)

    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'bad.csv'))}: .*{message}"):
        read_points(path)


def test_csv_class_column_gives_labels_grouped_like_the_points(tmp_path: Path) -> None:
    path = tmp_path / "points.csv"
    path.write_text("image,x,y,class\nb,1,2,lymphocyte\na,3,4,stromal\nb,5,6,\na,7,8,tumor_epithelial\n")

    points = read_labelled_points(path)

    assert list(points) == ["b", "a"]  # file order, as read_points
    np.testing.assert_array_equal(points["b"].xy, [[1, 2], [5, 6]])
    assert points["b"].labels.tolist() == ["lymphocyte", None]  # an empty cell is no label
    assert points["a"].labels.tolist() == ["stromal", "tumor_epithelial"]
    assert read_labelled_points(path, image="a")["a"].labels.tolist() == ["stromal", "tumor_epithelial"]
    np.testing.assert_array_equal(read_points(path)["b"], points["b"].xy)


@pytest.mark.parametrize(
    ("header", "rows", "labels"),
    [
        ("x,y,Classification", ["1,2,Tumor", "3,4,Stroma"], ["Tumor", "Stroma"]),
        ("x,y,type", ["1,2,1", "3,4,2"], ["1", "2"]),  # numbered types are classes (users map them)
        ("X, Y ,label", ["1,2,tumour", "3,4,stroma"], ["tumour", "stroma"]),
        ("label,x,y,area_px", ["1,1,2,30", "2,3,4,31"], None),  # MoNuSeg's instance ids: no classes
        ("x,y,label,class", ["1,2,7,Tumor", "3,4,8,"], ["Tumor", None]),  # `class` wins over `label`
        ("x,y,confidence", ["1,2,0.9", "3,4,0.8"], None),
        ("x,y,class", ["1,2,", "3,4,"], None),  # a class column nobody filled in
    ],
)
def test_csv_class_column_names(tmp_path: Path, header: str, rows: list[str], labels: list | None) -> None:
    path = tmp_path / "slide.csv"
    path.write_text("\n".join([header, *rows]) + "\n")

    points = read_labelled_points(path)["slide"]

    np.testing.assert_array_equal(points.xy, [[1, 2], [3, 4]])
    assert (points.labels.tolist() if points.labels is not None else None) == labels


def test_data_set_tables_carry_their_classes(shared_data: Path) -> None:
    brca = read_labelled_points(shared_data / "brca-m2c/points.csv")
    labels = np.concatenate([p.labels for p in brca.values()])
    assert len(brca) == 120 and len(labels) == 30_638
    assert {k: int(n) for k, n in zip(*np.unique(labels, return_counts=True))} == {
        "lymphocyte": 5_859, "stromal": 7_981, "tumor_epithelial": 16_798}  # ../shared/data/README.md
    assert all(p.labels is None for p in read_labelled_points(shared_data / "crc-dev/points.csv").values())
    monuseg = read_labelled_points(shared_data / "monuseg-train/centroids" / f"train_{MONUSEG_IMAGE}_from_masks.csv")
    assert monuseg[MONUSEG_IMAGE].labels is None  # label,x,y,area_px: instance ids


# ---------------------------------------------------------------------------------- CellCounter XML

CELLCOUNTER_XML = """<?xml version="1.0" encoding="UTF-8"?>
<CellCounter_Marker_File>
  <Image_Properties>
    <Image_Filename>{filename}</Image_Filename>
  </Image_Properties>
  <Marker_Data>
    <Current_Type>1</Current_Type>
    <Marker_Type>
      <Type>1</Type>
      <Name>Nucleus</Name>
      <Marker><MarkerX>120</MarkerX><MarkerY>45</MarkerY><MarkerZ>1</MarkerZ></Marker>
      <Marker><MarkerX>7</MarkerX><MarkerY>300</MarkerY><MarkerZ>1</MarkerZ></Marker>
    </Marker_Type>
    <Marker_Type>
      <Type>2</Type>
      <Name>Mitosis</Name>
      <Marker><MarkerX>64</MarkerX><MarkerY>0</MarkerY><MarkerZ>1</MarkerZ></Marker>
    </Marker_Type>
    <Marker_Type>
      <Type>3</Type>
    </Marker_Type>
  </Marker_Data>
</CellCounter_Marker_File>
"""


def test_cellcounter_markers_of_all_types_keyed_by_their_image(tmp_path: Path) -> None:
    path = tmp_path / "counts.xml"
    path.write_text(CELLCOUNTER_XML.format(filename="slide-12.tif"))

    points = read_points(path)

    assert list(points) == ["slide-12"]
    np.testing.assert_array_equal(points["slide-12"], [[120, 45], [7, 300], [64, 0]])
    assert list(read_points(path, image="renamed")) == ["renamed"]


def test_cellcounter_labels_are_the_counter_names_or_type_numbers(tmp_path: Path) -> None:
    path = tmp_path / "counts.xml"
    unnamed = "<Marker_Type><Type>4</Type><Marker><MarkerX>1</MarkerX><MarkerY>2</MarkerY></Marker></Marker_Type>"
    path.write_text(CELLCOUNTER_XML.format(filename="slide-12.tif").replace("</Marker_Data>", unnamed + "</Marker_Data>"))

    points = read_labelled_points(path)["slide-12"]

    np.testing.assert_array_equal(points.xy, [[120, 45], [7, 300], [64, 0], [1, 2]])
    assert points.labels.tolist() == ["Nucleus", "Nucleus", "Mitosis", "Type 4"]


def test_cellcounter_without_image_filename_is_named_after_the_file(tmp_path: Path) -> None:
    path = tmp_path / "CellCounter_slide-12.xml"  # the name Fiji proposes
    path.write_text(CELLCOUNTER_XML.format(filename=""))

    assert list(read_points(path)) == ["slide-12"]


def test_cellcounter_marker_without_coordinates_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.xml"
    path.write_text(CELLCOUNTER_XML.format(filename="a.tif").replace("<MarkerY>45</MarkerY>", ""))

    with pytest.raises(ValueError, match=r"broken\.xml: a <Marker> has no numeric MarkerX and MarkerY \('120', None\)"):
        read_points(path)


# ---------------------------------------------------------------------------------- ImageScope XML


def test_imagescope_region_centroids_match_the_published_table(shared_data: Path) -> None:
    folder = shared_data / "slides/monusac"
    table = _csv_rows(folder / "centroids_from_xml.csv")

    for image in ("A9K0_1", "A9K0_2", "A9K0_3"):
        expected = [r for r in table if r["image"] == image]
        points = read_points(folder / f"{image}.xml")
        regions = read_imagescope_regions(folder / f"{image}.xml")

        assert list(points) == [image]
        assert len(points[image]) == len(regions) == len(expected)
        # The table repaired self-crossing outlines with buffer(0), which drops slivers that make_valid keeps.
        np.testing.assert_allclose(points[image], [(float(r["x"]), float(r["y"])) for r in expected], atol=0.05)
        assert [name for name, _ in regions] == [r["class"] for r in expected]
        assert read_labelled_points(folder / f"{image}.xml")[image].labels.tolist() == [r["class"] for r in expected]
    assert len(table) == 640


def test_imagescope_regions_count_like_the_label_map(shared_data: Path) -> None:
    """The same MoNuSeg annotation as polygons and as a label map: one point per nucleus, near each other."""
    image = "TCGA-21-5784-01Z-00-DX1"
    from_xml = read_points(shared_data / "monuseg-train/xml" / f"{image}.xml")[image]
    from_mask = read_points(shared_data / "monuseg-train/labels" / f"{image}.png")[image]

    assert len(from_xml) == len(from_mask) == 398
    nearest = np.min(np.hypot(*(from_xml[:, None, :] - from_mask[None, :, :]).transpose(2, 0, 1)), axis=1)
    # The label maps were rasterised from these polygons about one pixel up-left of them.
    assert np.median(nearest) < 1.5


def _imagescope(regions: str) -> str:
    return f"""<Annotations MicronsPerPixel="0.25">
  <Annotation Id="1" Name="" Type="4">
    <Attributes><Attribute Name="Lymphocyte" Id="0" Value=""/></Attributes>
    <Regions>
      <RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region"/></RegionAttributeHeaders>
      {regions}
    </Regions>
  </Annotation>
</Annotations>"""


def _region(vertices: list[tuple[float, float]], negative: bool = False) -> str:
    v = "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in vertices)
    return f'<Region Id="1" Type="0" NegativeROA="{int(negative)}"><Attributes/><Vertices>{v}</Vertices></Region>'


def test_imagescope_centroid_is_the_area_centroid_even_for_odd_outlines(tmp_path: Path) -> None:
    path = tmp_path / "odd.xml"
    dense_side = [(0, y) for y in np.linspace(10, 0, 50)]  # many vertices on one side must not pull the centre
    path.write_text(
        _imagescope(
            _region([(0, 0), (10, 0), (10, 10), (0, 10)] + dense_side)
            + _region([(100, 50), (104, 58)])  # an ellipse stored as two corners
            + _region([(0, 0), (10, 10), (10, 0), (0, 10)])  # bow tie: self-intersecting
            + _region([(1, 1), (2, 2), (3, 3)])  # collinear: no area
            + _region([(0, 0), (5, 0), (5, 5)], negative=True)  # a hole, not a nucleus
            + '<Region Id="9"><Vertices/></Region>'
        )
    )

    regions = read_imagescope_regions(path)

    assert [name for name, _ in regions] == ["Lymphocyte"] * 4
    np.testing.assert_allclose([c for _, c in regions], [[5, 5], [102, 54], [5, 5], [2, 2]], atol=1e-9)


def test_imagescope_layers_without_a_class_give_no_labels(tmp_path: Path) -> None:
    path = tmp_path / "layer.xml"
    path.write_text(_imagescope(_region([(0, 0), (4, 0), (4, 4), (0, 4)])).replace(
        '<Attribute Name="Lymphocyte" Id="0" Value=""/>', '<Attribute Name="Description" Id="0" Value=""/>'))

    points = read_labelled_points(path)["layer"]

    np.testing.assert_allclose(points.xy, [[2, 2]])
    assert points.labels is None  # ImageScope's default attribute and an unnamed layer name no class


def test_unknown_xml_is_rejected_by_its_root_element(tmp_path: Path) -> None:
    path = tmp_path / "other.xml"
    path.write_text("<Document><Marker/></Document>")

    with pytest.raises(ValueError, match=r"other\.xml: unknown XML annotation format \(root element <Document>"):
        read_points(path)
    with pytest.raises(ValueError, match=r"other\.xml: not an Aperio ImageScope XML file"):
        read_imagescope_regions(path)

    path.write_text("<Annotations><Region>")
    with pytest.raises(ValueError, match=r"other\.xml: not well-formed XML"):
        read_points(path)


# ------------------------------------------------------------------------------------- label maps


def test_label_map_centroids_match_the_published_centroids(shared_data: Path) -> None:
    for image in (MONUSEG_IMAGE, "TCGA-A7-A13E-01Z-00-DX1"):
        table = _csv_rows(shared_data / "monuseg-train/centroids" / f"train_{image}_from_masks.csv")
        label_map = read_label_map(shared_data / "monuseg-train/labels" / f"{image}.png")

        labels, xy = label_centroids(label_map)

        assert label_map.dtype == np.uint16 and label_map.shape == (1000, 1000)
        assert labels.tolist() == [int(r["label"]) for r in table]
        np.testing.assert_allclose(xy, [(float(r["x"]), float(r["y"])) for r in table], atol=0.5)
        np.testing.assert_array_equal(read_points(shared_data / "monuseg-train/labels" / f"{image}.png")[image], xy)


def _toy_label_map() -> np.ndarray:
    label_map = np.zeros((6, 8), np.uint16)
    label_map[1:3, 1:5] = 3  # 2 rows x 4 columns: centre x 2.5, y 1.5
    label_map[5, 7] = 700  # one pixel: exactly its index
    return label_map


@pytest.mark.parametrize("name", ["cells_labels.png", "cells.tif", "cells.ome.tiff"])
def test_label_map_files_give_one_centroid_per_label(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".png"):
        Image.fromarray(_toy_label_map()).save(path)
    else:
        tifffile.imwrite(path, _toy_label_map().astype(np.int32))

    points = read_points(path)

    assert list(points) == ["cells"]
    np.testing.assert_array_equal(points["cells"], [[2.5, 1.5], [7.0, 5.0]])
    assert read_label_map(path).max() == 700
    assert read_labelled_points(path)["cells"].labels is None  # masks name no class


def test_images_that_are_not_label_maps_are_rejected(tmp_path: Path) -> None:
    rgb = tmp_path / "overlay.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    floats = tmp_path / "probability.tif"
    tifffile.imwrite(floats, np.zeros((4, 4), np.float32))

    with pytest.raises(ValueError, match=r"overlay\.png: RGB image, not an instance label map"):
        read_points(rgb)
    with pytest.raises(ValueError, match=r"probability\.tif: float32 pixels, not an instance label map"):
        read_label_map(floats)


# ------------------------------------------------------------------------------------------- GeoJSON


def _qupath_detection(x: float, y: float) -> dict:
    return {
        "type": "Feature",
        "id": "8a1c6f4e-1b7e-4d7a-9d55-3c0f8a6e2b10",
        "geometry": {"type": "Point", "coordinates": [x, y]},
        "properties": {"objectType": "detection"},
    }


def test_geojson_feature_collection_of_mixed_geometries(tmp_path: Path) -> None:
    square = [[[10, 20], [14, 20], [14, 24], [10, 24], [10, 20]]]
    square_right = [[[30, 20], [34, 20], [34, 24], [30, 24], [30, 20]]]
    cell = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]},
        "nucleusGeometry": {"type": "Polygon", "coordinates": square},
        "properties": {"objectType": "cell"},
    }
    collection = {
        "type": "FeatureCollection",
        "features": [
            _qupath_detection(1.5, 2.5),
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square}, "properties": {}},
            {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [square, square_right]}},
            {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[5, 6], [7, 8, 0]]}},
            {"type": "Feature", "geometry": None, "properties": {}},
            cell,
        ],
    }
    path = tmp_path / "slide 3.geojson"
    path.write_text(json.dumps(collection))

    points = read_points(path)

    assert list(points) == ["slide 3"]
    np.testing.assert_allclose(points["slide 3"], [[1.5, 2.5], [12, 22], [22, 22], [5, 6], [7, 8], [12, 22]])


def test_qupath_list_of_features_gzipped(tmp_path: Path) -> None:
    path = tmp_path / "slide.geojson.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump([_qupath_detection(3, 4), _qupath_detection(30.25, 40.5)], fh)

    points = read_points(path)

    np.testing.assert_array_equal(points["slide"], [[3, 4], [30.25, 40.5]])


def _classified(x: float, y: float, classification: object) -> dict:
    feature = _qupath_detection(x, y)
    if classification is not None:
        feature["properties"]["classification"] = classification
    return feature


def test_qupath_classifications_of_every_version_are_labels(tmp_path: Path) -> None:
    multi = {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[5, 6], [7, 8]]},
             "properties": {"objectType": "annotation", "classification": {"name": "Immune cells", "color": [160, 90, 160]}}}
    features = [
        _classified(1, 2, {"name": "Tumor", "color": [200, 0, 0]}),  # QuPath 0.2-0.5
        _classified(3, 4, "Stroma"),  # before 0.2: the name as a string
        _classified(9, 9, {"names": ["Tumor", "Positive"], "color": [200, 0, 0]}),  # 0.4+: a derived class, joined
        _classified(9, 8, None),  # unclassified
        multi,  # a Points annotation: every point has its class
    ]
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))

    points = read_labelled_points(path)["slide"]

    np.testing.assert_array_equal(points.xy, [[1, 2], [3, 4], [9, 9], [9, 8], [5, 6], [7, 8]])
    assert points.labels.tolist() == ["Tumor", "Stroma", "Tumor: Positive", None, "Immune cells", "Immune cells"]

    path.write_text(json.dumps([_qupath_detection(1, 2), _qupath_detection(3, 4)]))
    assert read_labelled_points(path)["slide"].labels is None  # nothing classified: no classes


def test_geojson_is_recognised_by_content_whatever_its_extension(tmp_path: Path) -> None:
    path = tmp_path / "export.txt"
    path.write_text(json.dumps(_qupath_detection(9, 8)))

    assert read_points(path)["export"].tolist() == [[9.0, 8.0]]


def test_geojson_with_unsupported_geometry_names_the_feature(tmp_path: Path) -> None:
    path = tmp_path / "lines.geojson"
    feature = {"type": "Feature", "id": "abc", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))

    expected = r"lines\.geojson: feature 0 \(id 'abc'\): unsupported geometry type 'LineString'"
    with pytest.raises(ValueError, match=expected):
        read_points(path)


# -------------------------------------------------------------------------------------------- naming


def test_unknown_format_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("nothing here")

    with pytest.raises(ValueError, match=r"notes\.txt: unknown annotation format"):
        read_points(path)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        (f"train_{MONUSEG_IMAGE}_from_masks.csv", MONUSEG_IMAGE),
        ("img1_points.csv", "img1"),
        ("A9K0_1.xml", "A9K0_1"),
        ("slide.geojson.gz", "slide"),
        ("case_7-labels.png", "case_7"),
        ("scan.v2.csv", "scan.v2"),
        ("export.txt", "export"),
    ],
)
def test_image_key_strips_annotation_decorations(name: str, key: str) -> None:
    assert image_key(name) == key
