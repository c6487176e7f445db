package android.widget;

public class RadioGroup extends android.view.View {
    public int getCheckedRadioButtonId() { throw new RuntimeException("stub"); }
}
